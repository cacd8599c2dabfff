"""What a node checks in an app bundle (FAB) before it runs it: the files it carries, and the
federation operator's signature over them.

A bundle is the zip `flwr run` uploads. Its files are hashed from the bytes it carries, never
from its own manifest (`.info/CONTENT`, which the sender writes). The operator signs the
{path: sha256} map of the bundle Flower builds from the reviewed checkout
(`python -m federation.sign app`), and the signature travels inside the bundle as
`app-signature.json`: a JSON document, read as data, signed with an ed25519 key (OpenSSH
format, what `ssh-keygen -t ed25519` writes). A node that trusts the operator's public key runs
a bundle only when the signature verifies and the bundle's files are exactly the signed ones.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_public_key

FLOWER_MANIFEST = ".info/CONTENT"
SIGNATURE_FILE = "app-signature.json"
SIGNATURE_FORMAT = "spes-app-signature/1"
_NOT_HASHED = {FLOWER_MANIFEST, SIGNATURE_FILE}  # written by the sender and the signer, not app files


class BundleRefused(RuntimeError):
    """A node will not run this bundle (the message says why and what to do)."""


def bundle_files(fab: bytes) -> dict[str, str]:
    """{path: sha256} of every app file in a bundle, from the bytes it carries (manifest and signature left out)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            return {
                info.filename: hashlib.sha256(zf.read(info)).hexdigest()
                for info in zf.infolist()
                if not info.is_dir() and info.filename not in _NOT_HASHED
            }
    except zipfile.BadZipFile as exc:
        raise BundleRefused(f"the bundle is not a valid FAB: {exc}") from exc


def differences(bundle: dict[str, str], expected: dict[str, str]) -> list[str]:
    """What a bundle changes against the expected files: 'changed: p', 'added: p', 'missing: p', by path."""
    out = [f"changed: {p}" for p in bundle.keys() & expected.keys() if bundle[p] != expected[p]]
    out += [f"added: {p}" for p in bundle.keys() - expected.keys()]
    out += [f"missing: {p}" for p in expected.keys() - bundle.keys()]
    return sorted(out, key=lambda line: line.split(": ", 1)[1])


def listed(diff: list[str], shown: int = 10) -> str:
    """The first `shown` differences, and how many more there are."""
    more = f" (and {len(diff) - shown} more)" if len(diff) > shown else ""
    return f"{len(diff)} file(s): " + "; ".join(diff[:shown]) + more


def fingerprint(key: ed25519.Ed25519PublicKey) -> str:
    """`SHA256:<base64>` of the raw public key, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(_ssh_blob(key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _ssh_blob(key: ed25519.Ed25519PublicKey) -> bytes:
    return base64.b64decode(key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[1])


def _payload(files: dict[str, str]) -> bytes:
    return json.dumps({"format": SIGNATURE_FORMAT, "files": files}, sort_keys=True, separators=(",", ":")).encode()


def signature_document(files: dict[str, str], key: ed25519.Ed25519PrivateKey) -> str:
    """The `app-signature.json` text that signs these files with `key`."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "signed-by": fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(_payload(files))).decode(),
        "files": files,
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def load_trusted_keys(path: Path) -> list[ed25519.Ed25519PublicKey]:
    """The ed25519 public keys in an OpenSSH-format file, one per line (blank lines and `#` comments skipped)."""
    keys = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = load_ssh_public_key(line.strip().encode())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not an OpenSSH public key ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}:{number}: an app-signing key must be ed25519, got {type(key).__name__}")
        keys.append(key)
    if not keys:
        raise ValueError(f"{path}: no public key in it")
    return keys


def _signature_text(fab: bytes) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            return zf.read(SIGNATURE_FILE)
    except KeyError:
        raise BundleRefused(
            f"refused: the app bundle is not signed (no {SIGNATURE_FILE} in it); the federation's operator "
            "signs the app with `python -m federation.sign app --key <operator.key>` before `flwr run`"
        ) from None
    except zipfile.BadZipFile as exc:
        raise BundleRefused(f"the bundle is not a valid FAB: {exc}") from exc


def _signature(fab: bytes) -> tuple[dict[str, str], bytes, str]:
    """(signed files, signature bytes, the signer's name as the document gives it) from the bundle."""
    try:
        doc = json.loads(_signature_text(fab))
        files, raw = doc["files"], base64.b64decode(doc["signature"], validate=True)
        well_formed = doc["format"] == SIGNATURE_FORMAT and all(isinstance(v, str) for v in files.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        well_formed = False
    if not well_formed:
        raise BundleRefused(f"refused: {SIGNATURE_FILE} in the bundle is not a {SIGNATURE_FORMAT} document")
    return files, raw, str(doc.get("signed-by", "an unnamed key"))


def check_signed_bundle(fab: bytes, trusted: list[ed25519.Ed25519PublicKey]) -> str:
    """The signer's fingerprint if a trusted key signed exactly this bundle's files; else BundleRefused."""
    files, raw, named = _signature(fab)
    signer = next((k for k in trusted if _verifies(k, raw, _payload(files))), None)
    if signer is None:
        raise BundleRefused(
            f"refused: the app bundle's signature (it names {named}) does not verify with "
            f"any of this node's {len(trusted)} trusted key(s)"
        )
    diff = differences(bundle_files(fab), files)
    if diff:
        raise BundleRefused(f"refused: the app bundle differs from what its signer signed in {listed(diff)}")
    return fingerprint(signer)


def _verifies(key: ed25519.Ed25519PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True
