"""client_app.app_pin and the pinned SuperNode's option handling (the real SuperNode runs in
tests/test_launcher.py::test_pinned_supernode_runs_its_checkout_and_refuses_any_other_bundle)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from client_app.app_pin import check_bundle, checkout_files
from client_app.supernode import main
from common.app_bundle import BundleRefused, bundle_files, differences
from common.argv import pop_option

ROOT = Path(__file__).resolve().parent.parent


def _fab(files: dict[str, bytes], manifest: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(".info/CONTENT", manifest)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bundle_files_hashes_the_bytes_not_the_manifest():
    lying = f"a.py,{_sha(b'honest')},48"  # a manifest that claims other content
    assert bundle_files(_fab({"a.py": b"evil", "pkg/b.toml": b"x=1"}, lying)) == {
        "a.py": _sha(b"evil"),
        "pkg/b.toml": _sha(b"x=1"),
    }
    with pytest.raises(BundleRefused, match="not a valid FAB"):
        bundle_files(b"not a zip")


def test_differences_names_changed_added_and_missing_files_by_path():
    checkout = {"a.py": "1", "b.py": "2", "c.py": "3"}
    bundle = {"a.py": "1", "b.py": "X", "d.py": "4"}
    assert differences(bundle, checkout) == ["changed: b.py", "missing: c.py", "added: d.py"]
    assert differences(checkout, dict(checkout)) == []


def test_check_bundle_refuses_with_the_files_and_shows_at_most_ten():
    checkout = {f"f{i:02d}.py": _sha(b"ok") for i in range(12)}
    same = _fab(dict.fromkeys(checkout, b"ok"))
    check_bundle(same, checkout, Path("/co"))  # identical: no error
    changed = _fab({name: b"ok" if i else b"changed" for i, name in enumerate(checkout)})
    with pytest.raises(BundleRefused, match=r"in 1 file\(s\): changed: f00.py\. Check out"):
        check_bundle(changed, checkout, Path("/co"))
    with pytest.raises(BundleRefused, match=r"in 12 file\(s\): .*missing: f09.py \(and 2 more\)"):
        check_bundle(_fab({}), checkout, Path("/co"))


def test_checkout_files_are_the_files_on_disk_that_flower_ships():
    files = checkout_files(ROOT)
    assert files["client_app/app_pin.py"] == _sha((ROOT / "client_app/app_pin.py").read_bytes())
    assert "pyproject.toml" in files and ".info/CONTENT" not in files
    assert not any(name.startswith((".venv/", "outputs/", ".git/")) for name in files), sorted(files)[:5]


def test_pinned_supernode_options():
    assert pop_option(["--a", "1", "--pin", "off", "--b"], "--pin") == ("off", ["--a", "1", "--b"])
    assert pop_option(["--pin=/x", "--port", "9"], "--pin") == ("/x", ["--port", "9"])
    assert pop_option(["--port", "9"], "--pin") == (None, ["--port", "9"])
    with pytest.raises(SystemExit, match="--isolation is this command's to set"):
        main(["--isolation", "subprocess", "--insecure"])
    with pytest.raises(SystemExit, match="Flower's installer would run it in a fresh one"):
        main(["--insecure", "--allow-runtime-dependency-installation"])
    with pytest.raises(SystemExit, match="no pyproject.toml"):
        main(["--pin", "/nonexistent-checkout", "--insecure"])
