"""`python -m sim <hydra overrides>`: a SPES run as a single-machine Flower simulation.

    python -m sim                                   # the demo: 4 nodes, tiny model
    python -m sim nodes=4 model=tiny rounds=20 strategy.local_steps=25

The config is composed and validated here first, so a bad config fails before anything
starts; then `flwr run` launches the app on a local simulation SuperLink with one virtual
SuperNode per node (1 CPU each), FLWR_HOME inside the run directory, and everything is torn
down at the end.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Config keys and presets: conf/config.yaml, conf/model/*.yaml, conf/strategy/*.yaml")
        return 0
    from server_app.config import ConfigError, load
    from sim.launcher import run_app

    try:
        spec = load(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    run_dir = spec.run_dir
    nodes_dir = run_dir / "nodes"
    shutil.rmtree(nodes_dir, ignore_errors=True)  # node state belongs to one run
    (run_dir / "summary.json").unlink(missing_ok=True)
    run_config = {
        "overrides": " ".join(shlex.quote(a) for a in argv),
        "output-dir": str(Path(spec.output_dir).expanduser().resolve()),
        "node-work-dir": str(nodes_dir),
    }
    print(f"[sim] {spec.nodes} simulated nodes, model={spec.model.name}, {spec.rounds} rounds; run dir {run_dir}")
    try:
        rc = run_app(APP_DIR, run_dir / "flower", spec.nodes, run_config, cpus_per_node=1)
    except KeyboardInterrupt:
        print("[sim] interrupted; the simulation was stopped and cleaned up", file=sys.stderr)
        return 130
    summary = run_dir / "summary.json"
    if rc != 0 or not summary.exists():
        print(f"[sim] run failed (exit {rc}); logs: {run_dir / 'flower'}", file=sys.stderr)
        return rc or 1
    s = json.loads(summary.read_text())
    print(
        f"[sim] held-out loss {s['first_val_loss']:.3f} -> {s['final_val_loss']:.3f} in {s['wall_s']:.0f}s; "
        f"outputs: {run_dir}/ (model/, metrics.jsonl, summary.json, loss.png)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
