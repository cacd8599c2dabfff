"""`python -m client_app.clean`: a node's saved state per run, with its size, and removing old runs'.

    python -m client_app.clean                         # list the runs under the node's work dir
    python -m client_app.clean --older-than 7          # remove runs untouched for 7 days
    python -m client_app.clean --remove <run> [...]    # remove these runs' folders
    python -m client_app.clean --work-dir /scratch/spes ...

A node keeps `<work dir>/<run>/partition-<i>/` per run (its last two states, the tokenizer, the
data cache, its worker's log) so that it can resume. A completed run's folder is removed when the
coordinator says the run ended (client_app/run_end.py) unless node-config keep-state; this lists
and removes what is left (interrupted runs, kept ones, nodes that were offline at the end). The
work dir is the node's: `--work-dir`, else $SPES_NODE_WORK_DIR, else ~/.cache/spes-flower/nodes,
as for the SuperNode. A run touched in the last `--busy-minutes`
(default 10) is in use, and is not removed unless `--force`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client_app.node_settings import DEFAULT_WORK_DIR, ENV_WORK_DIR
from client_app.node_state import saved_steps


@dataclass(frozen=True)
class RunFolder:
    path: Path
    size_bytes: int
    modified: float  # newest modification time of anything inside (seconds since the epoch)
    partitions: list[str]
    last_step: int | None  # newest saved state of any partition


def _walk(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of a folder's files, links not followed."""
    size, newest = 0, path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in [*files, *dirs]:
            st = (Path(root) / name).lstat()
            newest = max(newest, st.st_mtime)
            if name in files:
                size += st.st_size
    return size, newest


def folder_bytes(path: Path) -> int:
    """The bytes of the files under `path` (links not followed)."""
    return _walk(path)[0]


def run_folders(work_root: Path) -> list[RunFolder]:
    """The run folders (those holding a partition-<i>) under a node's work dir, oldest first."""
    out = []
    folders = [p for p in work_root.iterdir() if p.is_dir() and not p.is_symlink()] if work_root.is_dir() else []
    for path in folders:
        parts = sorted(p.name for p in path.glob("partition-*") if p.is_dir())
        if not parts:
            continue  # not a run's folder: leave it alone
        size, modified = _walk(path)
        steps = [s for part in parts for s in saved_steps(path / part / "state")]
        out.append(RunFolder(path, size, modified, parts, max(steps) if steps else None))
    return sorted(out, key=lambda r: r.modified)


def human(n: float) -> str:
    """Bytes in the largest binary unit up to GiB that keeps the number at least 1."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def listing(runs: list[RunFolder], now: float) -> str:
    lines = [f"{'run':<40} {'size':>10} {'age':>8}  last step  partitions"]
    for r in runs:
        age = f"{(now - r.modified) / 86400:.1f} d"
        step = "-" if r.last_step is None else str(r.last_step)
        lines.append(f"{r.path.name:<40} {human(r.size_bytes):>10} {age:>8}  {step:>9}  {', '.join(r.partitions)}")
    lines.append(f"{len(runs)} run(s), {human(sum(r.size_bytes for r in runs))} in all")
    return "\n".join(lines)


def select(runs: list[RunFolder], names: list[str], older_than_days: float | None, now: float) -> list[RunFolder]:
    """The runs named, or untouched for longer than `older_than_days`; an unknown name is an error."""
    by_name = {r.path.name: r for r in runs}
    if unknown := sorted(set(names) - set(by_name)):
        raise ValueError(f"no run folder {', '.join(unknown)} here (see the listing)")
    chosen = [by_name[n] for n in names]
    if older_than_days is not None:
        chosen += [r for r in runs if now - r.modified > older_than_days * 86400 and r not in chosen]
    return chosen


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m client_app.clean", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=None, help=f"the node's work dir (default ${ENV_WORK_DIR})")
    ap.add_argument("--remove", nargs="+", default=[], metavar="RUN", help="remove these runs' folders")
    ap.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="remove runs untouched this long")
    ap.add_argument("--busy-minutes", type=float, default=10.0, help="a run touched this recently is in use")
    ap.add_argument("--force", action="store_true", help="remove runs in use too")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = (args.work_dir or Path(os.environ.get(ENV_WORK_DIR) or DEFAULT_WORK_DIR)).expanduser().resolve()
    now = time.time()
    runs = run_folders(root)
    print(f"node work dir {root}\n{listing(runs, now)}")
    if not args.remove and args.older_than is None:
        return 0
    try:
        chosen = select(runs, args.remove, args.older_than, now)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for run in chosen:
        if now - run.modified < args.busy_minutes * 60 and not args.force:
            print(f"kept {run.path.name}: touched {int(now - run.modified)} s ago, maybe in use (--force removes it)")
            status = 1
            continue
        try:
            shutil.rmtree(run.path)
        except OSError as exc:
            print(f"could not remove {run.path.name}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"removed {run.path.name} ({human(run.size_bytes)})")
    return status


if __name__ == "__main__":
    sys.exit(main())
