"""run.json: how a run was made, so that two run folders can be compared without memory.

The code's commit comes from the checkout the run was started from: `python -m sim` (either engine)
passes it in SPES_CODE_COMMIT, since a Flower simulation runs the ServerApp from an unpacked app
bundle with no git history; a run started any other way looks for a checkout beside the code, and
under Flower also records the app bundle's hash.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ENV_COMMIT = "SPES_CODE_COMMIT"  # "<sha>" or "<sha>+changes", set by the launcher
ENV_COMMAND = "SPES_COMMAND"  # the command line the user typed, set by the launcher
PACKAGES = ("torch", "transformers", "flwr", "datasets", "peft", "tokenizers", "safetensors", "numpy")
ROOT = Path(__file__).resolve().parent.parent


def code_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit, with "+changes" when tracked files differ from it; None outside git."""
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+changes" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _accelerator() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def provenance(config: dict[str, Any], fab_hash: str | None = None) -> dict[str, Any]:
    """Commit, package versions, interpreter, machine, start time, command line and the whole config."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": os.environ.get(ENV_COMMIT) or code_commit(),
        "app_bundle_hash": fab_hash or None,
        "command": os.environ.get(ENV_COMMAND) or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "accelerator": _accelerator(),
        },
        "config": config,
    }
