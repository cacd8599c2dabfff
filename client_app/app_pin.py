"""A node runs only the app it checked out: a bundle (FAB) whose files differ from the node's own
checkout is refused before any of its code is installed or loaded.

Flower 1.42's SuperNode runs whatever bundle the SuperLink hands it, and anyone who reaches the
SuperLink's port can submit one (`flwr run`; the open-source SuperLink has no run-submission
accounts). Its `--trusted-entities` check does not help a self-hosted federation: the SuperLink
attaches signatures only to Flower Hub apps, so a SuperNode with trusted entities refuses every
bundle `flwr run .` uploads. The pin puts the decision where an institution can make it: the
node compares the bundle, file by file, with the bundle Flower would build from the node's own
checkout (the commit the institution reviewed), and runs it only where they are the same.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

_MANIFEST = ".info/CONTENT"


class AppPinError(RuntimeError):
    """The bundle is not the node's checkout (the message lists the files that differ)."""


def bundle_files(fab: bytes) -> dict[str, str]:
    """{path: sha256} of every file in a bundle, hashed from the bytes it carries (not its manifest)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            return {
                info.filename: hashlib.sha256(zf.read(info)).hexdigest()
                for info in zf.infolist()
                if not info.is_dir() and info.filename != _MANIFEST
            }
    except zipfile.BadZipFile as exc:
        raise AppPinError(f"the bundle is not a valid FAB: {exc}") from exc


def checkout_files(root: Path) -> dict[str, str]:
    """{path: sha256} of the bundle Flower builds from `root` (its .gitignore and file rules applied)."""
    from flwr.cli.build import build_fab_from_disk

    return bundle_files(build_fab_from_disk(root))


def differences(bundle: dict[str, str], checkout: dict[str, str]) -> list[str]:
    """What a bundle changes against the checkout: 'changed: p', 'added: p', 'missing: p', sorted by path."""
    out = [f"changed: {p}" for p in bundle.keys() & checkout.keys() if bundle[p] != checkout[p]]
    out += [f"added: {p}" for p in bundle.keys() - checkout.keys()]
    out += [f"missing: {p}" for p in checkout.keys() - bundle.keys()]
    return sorted(out, key=lambda line: line.split(": ", 1)[1])


def check_bundle(fab: bytes, checkout: dict[str, str], root: Path, shown: int = 10) -> None:
    """Raise AppPinError unless the bundle's files are exactly the checkout's."""
    diff = differences(bundle_files(fab), checkout)
    if diff:
        more = f" (and {len(diff) - shown} more)" if len(diff) > shown else ""
        raise AppPinError(
            f"refused: the app bundle differs from this node's checkout {root} in {len(diff)} file(s): "
            + "; ".join(diff[:shown])
            + more
            + ". Check out the commit the federation runs (or start the node with --pin off to run any bundle)."
        )
