"""A node runs only the app it checked out: a bundle (FAB) whose files differ from the node's own
checkout is refused before any of its code is installed or loaded.

Flower 1.42's SuperNode runs whatever bundle the SuperLink hands it, and anyone who reaches the
SuperLink's port can submit one (`flwr run`; the open-source SuperLink has no run-submission
accounts). Its `--trusted-entities` check does not help a self-hosted federation: the SuperLink
attaches signatures only to Flower Hub apps, so a SuperNode with trusted entities refuses every
bundle `flwr run .` uploads. The pin puts the decision where an institution can make it: the
node compares the bundle, file by file, with the bundle Flower would build from the node's own
checkout (the commit the institution reviewed), and runs it only where they are the same. A
signature file in the bundle (common.app_bundle) is not an app file and is not compared.
"""

from __future__ import annotations

from pathlib import Path

from common.app_bundle import BundleRefused, bundle_files, differences, listed


def checkout_files(root: Path) -> dict[str, str]:
    """{path: sha256} of the bundle Flower builds from `root` (its .gitignore and file rules applied)."""
    from flwr.cli.build import build_fab_from_disk

    return bundle_files(build_fab_from_disk(root))


def check_bundle(fab: bytes, checkout: dict[str, str], root: Path) -> None:
    """Raise BundleRefused unless the bundle's files are exactly the checkout's."""
    diff = differences(bundle_files(fab), checkout)
    if diff:
        raise BundleRefused(
            f"refused: the app bundle differs from this node's checkout {root} in {listed(diff)}. "
            "Check out the commit the federation runs (or start the node with --pin off to run any bundle)."
        )
