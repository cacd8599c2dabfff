"""`python -m sim.compare <run dir> <run dir> ...`: runs side by side.

    python -m sim.compare outputs/demo outputs/no-merge                # table on stdout
    python -m sim.compare outputs/a outputs/b --out compare            # + compare/compare.md and compare.png

One table (final and best held-out loss, tokens, bytes per node and round, wall time, peak memory,
code commit) and the config keys whose values differ between the runs, then one plot of held-out
loss against tokens. Reads only what a run folder holds: summary.json, metrics.jsonl, run.json
(config.json for runs older than run.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def read_run(run_dir: Path) -> dict:
    """What the table needs of one run folder; a clear error when it is not one."""
    from server_app.report import read_rounds

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise SystemExit(f"{run_dir} has no summary.json: not a finished run folder")
    made = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    config = made.get("config") or (
        json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    )
    return {
        "dir": run_dir,
        "summary": json.loads(summary_path.read_text()),
        "rounds": read_rounds(run_dir),
        "config": _flat(config),
        "commit": made.get("commit"),
    }


def differing_keys(runs: list[dict]) -> dict[str, list[object]]:
    """Config keys whose value is not the same in every run (a key a run lacks counts as differing)."""
    keys = sorted(set().union(*(r["config"] for r in runs)))
    missing = object()
    out = {}
    for key in keys:
        values = [r["config"].get(key, missing) for r in runs]
        if any(v != values[0] for v in values):
            out[key] = ["-" if v is missing else v for v in values]
    return {k: v for k, v in out.items() if k not in ("run_name", "output_dir")}


def table(runs: list[dict]) -> list[str]:
    lines = [
        (
            "| run | final held-out loss | best (round) | tokens | MB up+down / node / round | wall s "
            "| peak MiB / node | commit |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        s, rounds = r["summary"], r["rounds"]
        best = min(rounds, key=lambda x: x.val_loss) if rounds else None
        per_node = (s.get("bytes_up_per_round_node", 0) + s.get("bytes_down_per_round_node", 0)) / 1e6
        lines.append(
            f"| {r['dir'].name} | {s['final_val_loss']:.4f} | "
            f"{f'{best.val_loss:.4f} ({best.round})' if best else '-'} | {s.get('tokens_trained', 0):,.0f} | "
            f"{per_node:.2f} | {s.get('wall_s', 0):.0f} | {s.get('peak_mem_mb_node', 0):.0f} | "
            f"{(r['commit'] or '?')[:12]} |"
        )
    return lines


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(runs):
        tokens = [0.0]
        for rec in r["rounds"]:
            tokens.append(tokens[-1] + rec.tokens)
        loss = [r["summary"]["first_val_loss"]] + [rec.val_loss for rec in r["rounds"]]
        ax.plot([t / 1e6 for t in tokens], loss, linestyle=styles[i % len(styles)], marker=".", label=r["dir"].name)
    ax.set_xlabel("tokens trained, all nodes (M)")
    ax.set_ylabel("held-out cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sim.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (outputs/<run_name>)")
    p.add_argument("--out", type=Path, help="also write compare.md and compare.png here")
    a = p.parse_args(argv)
    runs = [read_run(d) for d in a.runs]
    diff = differing_keys(runs)
    md = table(runs) + ["", "Config keys that differ:" if diff else "The configs are the same (but for the names)."]
    if diff:
        md += ["", "| key | " + " | ".join(r["dir"].name for r in runs) + " |", "|---|" + "---|" * len(runs)]
        md += [f"| {k} | " + " | ".join(str(v) for v in vals) + " |" for k, vals in diff.items()]
    print("\n".join(md))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        png = plot(runs, a.out / "compare.png")
        (a.out / "compare.md").write_text("\n".join(["# Runs compared", "", *md, "", f"![loss]({png.name})", ""]))
        print(f"[compare] {a.out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
