"""A SPES run on this machine (`python -m sim`), as a Flower simulation or in-process.

The config is composed and validated here first, so a bad config fails before anything
starts; then `flwr run` launches the app on a local simulation SuperLink with one virtual
SuperNode per node (1 CPU each), FLWR_HOME inside the run directory, and everything is torn
down at the end. With `engine=inprocess` the same ServerApp and ClientApp code runs in this
process instead (engine/inprocess.py: no SuperLink, no Ray). A run directory from an earlier run
is moved aside, never deleted.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from client_app.node_settings import ENV_COMMON_DATA, ENV_KEEP_STATE, ENV_PROGRESS, ENV_WORK_DIR
from engine.launcher import run_app
from server_app.config import ConfigError, load
from server_app.config import run_dir as spec_run_dir
from server_app.console import ENV_BAR
from server_app.provenance import ENV_COMMAND, ENV_COMMIT, code_commit
from server_app.run_lock import holder, move_aside

APP_DIR = Path(__file__).resolve().parent.parent


def node_environment(spec, run_dir: Path) -> dict[str, str]:
    """What the simulated nodes need from this machine: their work dir, the corpus (the source the user
    gave here is every simulated node's own setting: a node opens nothing only the coordinator names),
    progress bars."""
    env = {ENV_WORK_DIR: str(run_dir / "nodes"), ENV_PROGRESS: "1" if spec.logging.node_progress else "0"}
    env[ENV_KEEP_STATE] = "1"  # the nodes' folders are the run's own: kept, so a finished run goes on bit for bit
    source = spec.data.source
    if source.startswith("hf:"):
        env[ENV_COMMON_DATA] = source
    elif source != "embedded":
        env[ENV_COMMON_DATA] = str(Path(source).expanduser().resolve())
    return env


def run_environment(spec, run_dir: Path, argv: list[str]) -> dict[str, str]:
    """The nodes' environment, plus what the coordinator records in run.json: the checkout's commit
    (a Flower simulation runs an unpacked app bundle, with no git history) and the command line."""
    env = {**node_environment(spec, run_dir), ENV_COMMAND: " ".join(["python -m sim", *map(shlex.quote, argv)])}
    if (commit := code_commit(APP_DIR)) is not None:
        env[ENV_COMMIT] = commit
    return env


def simulate(argv: list[str]) -> int:
    """`python -m sim <overrides>`: 0 on success, 2 for a config error, else the run's exit status."""
    try:
        spec = load(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    run_dir = spec_run_dir(spec)
    if (busy := holder(run_dir)) is not None:
        print(
            f"config error: {run_dir} is in use by a running coordinator ({busy}); wait for it to end or stop it first",
            file=sys.stderr,
        )
        return 2
    if spec.resume:
        if not (run_dir / "checkpoint").is_dir():
            print(f"config error: resume=true but {run_dir} holds no checkpoint", file=sys.stderr)
            return 2
        (run_dir / "summary.json").unlink(missing_ok=True)
    elif (moved := move_aside(run_dir)) is not None:
        print(f"[sim] an earlier run in {run_dir} was moved to {moved}")
    run_config = {
        "overrides": " ".join(shlex.quote(a) for a in argv),
        "output-dir": str(Path(spec.output_dir).expanduser().resolve()),
    }
    print(
        f"[sim] {spec.nodes} simulated nodes, model={spec.model.name}, {spec.rounds} rounds, "
        f"engine={spec.engine}; run dir {run_dir}"
    )
    try:
        rc = (
            _run_inprocess(spec, run_dir, argv)
            if spec.engine == "inprocess"
            else run_app(
                APP_DIR,
                run_dir / "flower",
                spec.nodes,
                run_config,
                cpus_per_node=1,
                extra_env={**run_environment(spec, run_dir, argv), ENV_BAR: "1" if sys.stdout.isatty() else "0"},
                console="coordinator+nodes" if spec.logging.node_progress else "coordinator",
            )
        )
    except KeyboardInterrupt:
        print("[sim] interrupted; the simulation was stopped and cleaned up", file=sys.stderr)
        return 130
    summary = run_dir / "summary.json"
    if rc != 0 or not summary.exists():
        print(
            f"[sim] run failed (exit {rc}); coordinator log: {run_dir / 'coordinator.log'}, "
            f"Flower log: {run_dir / 'flower' / 'flwr-run.log'}",
            file=sys.stderr,
        )
        _print_failure(run_dir)
        return rc or 1
    s = json.loads(summary.read_text())
    print(
        f"[sim] held-out loss {s['first_val_loss']:.3f} -> {s['final_val_loss']:.3f} in {s['wall_s']:.0f}s; "
        f"report: {run_dir / 'report.md'} (model/, metrics.jsonl, summary.json, plots)"
    )
    return 0


def _run_inprocess(spec, run_dir: Path, argv: list[str]) -> int:
    """The run in this process (engine=inprocess); 0, or 1 after printing why it failed."""
    from engine import inprocess  # torch and transformers: only this engine needs them in this process

    try:
        inprocess.run(spec, run_environment(spec, run_dir, argv))
    except Exception as exc:  # the Flower simulation reports a failed ServerApp by exit status too
        print(f"[sim] the coordinator stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_failure(run_dir: Path) -> None:
    """The coordinator's last errors and the failed nodes of the last logged round."""
    log_file = run_dir / "coordinator.log"
    if log_file.exists():
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if "ERROR" in ln or "WARNING" in ln]
        for ln in lines[-8:]:
            print(f"  {ln}", file=sys.stderr)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and (rows := metrics.read_text().splitlines()):
        last = json.loads(rows[-1])
        for pid, node in last.get("nodes", {}).items():
            if node.get("status") != "ok":
                print(f"  round {last['round']} partition {pid}: {node.get('status')}", file=sys.stderr)
