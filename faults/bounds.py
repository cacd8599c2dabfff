"""`python -m faults.bounds`: how large honest updates are next to the round's median, to set the clip factors.

Runs honest federations (in-process engine, nothing clipped: clip factors 0, guard off) and reads
each node's `shared_update_scale` / `expert_update_scale` from metrics.jsonl: its largest update
norm over the median norm it is clipped against (strategy/robust.py), and `shared_update_cosine`
(its agreement with the others; below 0 makes it a suspect the guard tests). The defaults
`strategy.clip_shared` / `clip_experts` must sit well above the largest honest value. Writes
benchmarks/honest_bounds.json; docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server_app.report import read_rounds

ROOT = Path(__file__).resolve().parent.parent
UNBOUNDED = ["engine=inprocess", "strategy.clip_shared=0", "strategy.clip_experts=0", "strategy.guard.enabled=false"]
CASES = {
    "tiny, 4 nodes, H=25 (demo)": ["model=tiny", "nodes=4", "rounds=8", "strategy.local_steps=25"],
    "tiny, 4 nodes, H=100": ["model=tiny", "nodes=4", "rounds=3", "strategy.local_steps=100"],
    "tiny, 8 nodes, H=25": ["model=tiny", "nodes=8", "rounds=4", "strategy.local_steps=25"],
    "tiny, 4 nodes, contiguous data": ["model=tiny", "nodes=4", "rounds=6", "data.partition=contiguous"],
    "tiny, 4 nodes, LoRA rank 8": ["model=tiny", "nodes=4", "rounds=6", "train.lora_rank=8"],
    "tiny, DiLoCo, 4 nodes": ["model=tiny", "strategy=diloco", "nodes=4", "rounds=6", "strategy.local_steps=25"],
}


def measure(name: str, overrides: list[str], workdir: Path) -> dict:
    run_name = f"bounds{len(list(workdir.iterdir()))}"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "sim", *UNBOUNDED, *overrides, f"run_name={run_name}", f"output_dir={workdir}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    scales: dict[str, list[float]] = {"shared": [], "expert": []}
    cosines = []
    for record in read_rounds(workdir / run_name):
        for node in record.nodes.values():
            for kind in scales:
                if f"{kind}_update_scale" in node:
                    scales[kind].append(float(node[f"{kind}_update_scale"]))
            if "shared_update_cosine" in node:
                cosines.append(float(node["shared_update_cosine"]))
    return {
        "overrides": overrides,
        "node_rounds": len(scales["shared"]),
        "shared_max": max(scales["shared"], default=None),
        "expert_max": max(scales["expert"], default=None),
        "cosine_min": min(cosines, default=None),
        "wall_s": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "honest_bounds.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            results[name] = measure(name, overrides, Path(tmp))
            r = results[name]
            print(
                f"{name}: largest shared {r['shared_max']}, expert {r['expert_max']}, smallest cosine "
                f"{r['cosine_min']} ({r['wall_s']} s)",
                flush=True,
            )
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cases": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
