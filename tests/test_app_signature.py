"""Operator-signed app bundles: common.app_bundle (the node's check), federation.sign (the operator's
command) and the signed SuperNode's options. A real SuperNode with --trust runs in
tests/test_launcher.py::test_trusting_supernode_runs_only_bundles_its_operator_signed."""

from __future__ import annotations

import io
import json
import re
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from client_app.app_pin import check_bundle, checkout_files
from client_app.supernode import main as supernode_main
from common.app_bundle import (
    SIGNATURE_FILE,
    BundleRefused,
    bundle_files,
    check_signed_bundle,
    fingerprint,
    load_trusted_keys,
    signature_document,
)
from federation.certs import write_node_key
from federation.sign import main as sign_main

TOY_APP = Path(__file__).parent / "fixtures" / "toy_app"
# RFC 8032 section 7.1, test 1: the secret key, and its public key's fingerprint as `ssh-keygen -lf` prints it
RFC8032_SECRET = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_SSH_FINGERPRINT = "SHA256:bbXpuKG6zhzdmnxq256TlqzFBzRl2f6OOg722cYNbU8"


def _fab(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(".info/CONTENT", "written by the sender")
    return buf.getvalue()


def _signed(files: dict[str, bytes], key: ed25519.Ed25519PrivateKey) -> dict[str, bytes]:
    doc = signature_document(bundle_files(_fab(files)), key).encode()
    return {**files, SIGNATURE_FILE: doc}


def _public_line(key: ed25519.Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


APP = {"pyproject.toml": b"[project]\nname='x'\n", "pkg/app.py": b"print('ours')\n"}


def test_fingerprint_is_what_ssh_keygen_prints():
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032_SECRET))
    assert fingerprint(key.public_key()) == RFC8032_SSH_FINGERPRINT


def test_a_trusted_signature_over_exactly_these_files_is_accepted():
    operator, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    signed = _fab(_signed(APP, operator))
    assert check_signed_bundle(signed, [other.public_key(), operator.public_key()]) == fingerprint(
        operator.public_key()
    )
    doc = json.loads(zipfile.ZipFile(io.BytesIO(signed)).read(SIGNATURE_FILE))
    assert doc["signed-by"] == fingerprint(operator.public_key())
    assert sorted(doc["files"]) == ["pkg/app.py", "pyproject.toml"]  # neither manifest nor signature signed


def test_unsigned_foreign_and_altered_bundles_are_refused():
    operator, stranger = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    trusted = [operator.public_key()]
    with pytest.raises(BundleRefused, match="not signed .* `python -m federation.sign app"):
        check_signed_bundle(_fab(APP), trusted)
    with pytest.raises(BundleRefused, match=r"does not verify with any of this node's 1 trusted key\(s\)"):
        check_signed_bundle(_fab(_signed(APP, stranger)), trusted)
    altered = {**_signed(APP, operator), "pkg/app.py": b"print('theirs')\n", "pkg/extra.py": b""}
    with pytest.raises(BundleRefused, match=r"differs from what its signer signed in 2 file\(s\): "):
        check_signed_bundle(_fab(altered), trusted)
    dropped = {k: v for k, v in _signed(APP, operator).items() if k != "pkg/app.py"}
    with pytest.raises(BundleRefused, match=r"in 1 file\(s\): missing: pkg/app.py"):
        check_signed_bundle(_fab(dropped), trusted)


def test_a_signature_that_names_the_trusted_key_but_signs_other_files_is_refused():
    operator = ed25519.Ed25519PrivateKey.generate()
    doc = json.loads(_signed(APP, operator)[SIGNATURE_FILE])
    doc["files"]["pkg/app.py"] = "0" * 64  # the claimed files change, the signature stays
    forged = {**APP, SIGNATURE_FILE: json.dumps(doc).encode()}
    with pytest.raises(BundleRefused, match=re.escape(f"it names {doc['signed-by']})") + " does not verify"):
        check_signed_bundle(_fab(forged), [operator.public_key()])


@pytest.mark.parametrize(
    "text",
    [b"not json", b"[]", b'{"format": "spes-app-signature/1"}', b'{"format": "other", "files": {}, "signature": ""}'],
)
def test_a_malformed_signature_file_is_refused_not_trusted(text: bytes):
    with pytest.raises(BundleRefused, match="is not a spes-app-signature/1 document"):
        check_signed_bundle(_fab({**APP, SIGNATURE_FILE: text}), [ed25519.Ed25519PrivateKey.generate().public_key()])
    bad_b64 = {"format": "spes-app-signature/1", "files": {}, "signature": "!!"}
    with pytest.raises(BundleRefused, match="not a spes-app-signature/1"):
        check_signed_bundle(_fab({SIGNATURE_FILE: json.dumps(bad_b64).encode()}), [])


def test_trusted_keys_file_reads_ed25519_lines_and_refuses_other_keys(tmp_path: Path):
    a, b = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    keys = tmp_path / "trusted"
    keys.write_text(f"# the federation's operators\n{_public_line(a)} ops@a\n\n  {_public_line(b)}\n")
    assert [fingerprint(k) for k in load_trusted_keys(keys)] == [
        fingerprint(a.public_key()),
        fingerprint(b.public_key()),
    ]
    _, node_pub = write_node_key(tmp_path, "node")  # an ECDSA node key is not an app-signing key
    keys.write_text(f"{_public_line(a)}\n{node_pub.read_text()}")
    with pytest.raises(ValueError, match=r"trusted:2: an app-signing key must be ed25519"):
        load_trusted_keys(keys)
    keys.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no public key in it"):
        load_trusted_keys(keys)
    keys.write_text("ssh-ed25519 AAAA-not-base64\n")
    with pytest.raises(ValueError, match="trusted:1: not an OpenSSH public key"):
        load_trusted_keys(keys)


def test_operator_signs_a_checkout_and_the_bundle_flower_builds_from_it_verifies(tmp_path: Path, capsys):
    from flwr.cli.build import build_fab_from_disk

    app = shutil.copytree(TOY_APP, tmp_path / "app")
    assert sign_main(["key", "ops", "--out", str(tmp_path)]) == 0
    assert stat.S_IMODE((tmp_path / "ops.key").stat().st_mode) == 0o600
    assert sign_main(["app", str(app), "--key", str(tmp_path / "ops.key")]) == 0
    assert "signed 2 files with SHA256:" in capsys.readouterr().out
    trusted = load_trusted_keys(tmp_path / "ops.key.pub")
    fab = build_fab_from_disk(app)  # what `flwr run` uploads: the signature file travels inside
    assert SIGNATURE_FILE in zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert check_signed_bundle(fab, trusted) == fingerprint(trusted[0])
    check_bundle(fab, checkout_files(app), app)  # a pinned node does not count the signature as an app file
    (app / "spes_toy.py").write_text((app / "spes_toy.py").read_text() + "\n# edited after signing\n")
    with pytest.raises(BundleRefused, match="changed: spes_toy.py"):
        check_signed_bundle(build_fab_from_disk(app), trusted)


def test_sign_command_errors(tmp_path: Path, capsys):
    write_node_key(tmp_path, "node")
    assert sign_main(["app", str(TOY_APP), "--key", str(tmp_path / "node.key")]) == 2
    assert "an app-signing key must be ed25519" in capsys.readouterr().err
    assert sign_main(["app", str(tmp_path), "--key", str(tmp_path / "none.key")]) == 2
    assert sign_main(["key", "node", "--out", str(tmp_path)]) == 2  # never replaces a key
    assert "keeps its key" in capsys.readouterr().err
    sign_main(["key", "ops", "--out", str(tmp_path)])
    assert sign_main(["app", str(tmp_path / "nowhere"), "--key", str(tmp_path / "ops.key")]) == 2
    assert "no pyproject.toml" in capsys.readouterr().err


def test_trusting_supernode_options(tmp_path: Path):
    with pytest.raises(SystemExit, match="--trust and --pin .* give one"):
        supernode_main(["--trust", "k.pub", "--pin", "off", "--insecure"])
    with pytest.raises(SystemExit, match="--trust .*missing.pub"):
        supernode_main(["--trust", str(tmp_path / "missing.pub"), "--insecure"])
    key = tmp_path / "ops.pub"
    key.write_text(_public_line(ed25519.Ed25519PrivateKey.generate()) + "\n")
    with pytest.raises(SystemExit, match="Flower's installer would run it in a fresh one"):
        supernode_main(["--trust", str(key), "--insecure", "--allow-runtime-dependency-installation"])
