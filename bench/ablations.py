"""Ablations run by the bench entry point: `python -m bench --ablation merge|H|nodes|iid|all`.

Each ablation is a list of variants (label, strategy, extra Hydra overrides) applied on top of
the benchmark's overrides, so every variant shares model, data, seed and LR settings:

* merge  - SPES with the expert-merging warm-up on / off.
* H      - SPES with H in {25, 100, 400} at the same total steps (rounds = base steps / H).
* nodes  - SPES with 2, 4, 8 nodes at the same global batch (per-node batch = base global / N),
           so every variant sees the same tokens; with E = 16 a node owns 8, 4, 2 experts.
* iid    - SPES and DiLoCo on IID shards vs contiguous (non-IID) shards.

Results go to <out>/ablations/<name>.json (run directories recorded relative to that file's
folder); <docs>/results.md is rendered from every ablation JSON present through
bench/templates/results.md.j2 (so running one ablation keeps the others' sections).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from server_app.provenance import code_commit

ABLATIONS = ("merge", "H", "nodes", "iid")
ROOT = Path(__file__).resolve().parent.parent
TITLES = {
    "merge": "Expert-merging warm-up on / off (SPES)",
    "H": "Sync interval H at equal total steps (SPES)",
    "nodes": "Number of nodes at equal global batch (SPES)",
    "iid": "IID vs non-IID (contiguous) shards",
}
# The seeded study that answers each ablation's question (conf/study/<name>.yaml, docs/studies.md).
STUDIES = {"merge": "sync", "H": "sync", "nodes": "nodes", "iid": "nodes"}


def variants(name: str, base: list[str]) -> list[tuple[str, str, list[str]]]:
    from server_app.config import load

    spec = load(base)
    n, r, h, b = spec.nodes, spec.rounds, spec.strategy.local_steps, spec.train.batch_size
    if name == "merge":
        return [
            ("merge-on", "spes", ["strategy.merge.enabled=true"]),
            ("merge-off", "spes", ["strategy.merge.enabled=false"]),
        ]
    if name == "H":
        steps = r * h
        return [
            (f"H={x}", "spes", [f"strategy.local_steps={x}", f"rounds={max(1, steps // x)}"]) for x in (25, 100, 400)
        ]
    if name == "nodes":
        return [(f"nodes={k}", "spes", [f"nodes={k}", f"train.batch_size={max(1, n * b // k)}"]) for k in (2, 4, 8)]
    if name == "iid":
        return [(f"{s}-{p}", s, [f"data.partition={p}"]) for s in ("spes", "diloco") for p in ("iid", "contiguous")]
    raise ValueError(f"unknown ablation {name!r}; choose one of {ABLATIONS}")


def run_ablation(name: str, base: list[str], out: Path) -> dict:
    from bench.runs import merge_overrides, method_entry, owned_per_node, portable_arg, run_federated

    t0 = time.time()
    entries = {}
    for label, strategy, extra in variants(name, base):
        ov = merge_overrides(base, [f"strategy={strategy}", *extra])
        run_name = f"abl-{name}-{label}".replace("=", "")
        run_dir = run_federated(strategy, ov, out / "runs", run_name)
        entries[label] = {
            "strategy": strategy,
            "overrides": extra,
            **method_entry(run_dir, owned_per_node(ov), out / "ablations"),
        }
        print(
            f"[ablation {name}] {label}: final held-out loss {entries[label]['final_val_loss']:.4f} "
            f"({(time.time() - t0) / 60:.1f} min)",
            flush=True,
        )
    result = {
        "ablation": name,
        "command": f"python -m bench --ablation {name}",
        "base_overrides": [portable_arg(o) for o in base],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": code_commit(),
        "wall_s": time.time() - t0,
        "variants": entries,
        "order": list(entries),  # the JSON is written with sorted keys; keep the variants' order
    }
    (out / "ablations").mkdir(parents=True, exist_ok=True)
    (out / "ablations" / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def ablation_section(name: str, res: dict | None) -> dict:
    """What the results.md template shows for one ablation (res: its JSON, None if not run)."""
    section = {"name": name, "title": TITLES[name], "run": res, "png": f"ablation_{name}.png", "study": STUDIES[name]}
    if res is None:
        return section
    order = res.get("order") or [v[0] for v in variants(name, res["base_overrides"])]
    rows = []
    for label in order:
        e = res["variants"][label]
        rows.append(
            {
                **e,
                "label": label,
                "rounds": len(e["val_loss_by_round"]) - 1,
                "bytes_all_rounds": e["bytes_up_per_round_node"] + e["bytes_down_per_round_node"],
            }
        )
    best = min(rows, key=lambda r: r["final_val_loss"])
    section.update(
        rows=rows,
        best=best,
        others=[(r["label"], r["final_val_loss"] - best["final_val_loss"]) for r in rows if r is not best],
    )
    return section


def write_results_md(out: Path, docs: Path) -> Path:
    from bench.report import display_path, plot_loss, render

    docs.mkdir(parents=True, exist_ok=True)
    sections = []
    for name in ABLATIONS:
        path = out / "ablations" / f"{name}.json"
        section = ablation_section(name, json.loads(path.read_text()) if path.exists() else None)
        if section["run"] is not None:
            plot_loss(
                {r["label"]: (r["tokens_by_round"], r["val_loss_by_round"]) for r in section["rows"]},
                docs / section["png"],
                TITLES[name],
            )
        sections.append(section)
    path = docs / "results.md"
    path.write_text(render("results.md.j2", {"sections": sections, "ablations_dir": display_path(out / "ablations")}))
    return path


def run_ablations(which: str, base: list[str], out: Path, docs: Path) -> None:
    for name in ABLATIONS if which == "all" else (which,):
        run_ablation(name, base, out)
        write_results_md(out, docs)  # after each, so a long `all` leaves usable docs behind
    print(f"[ablation] wrote {docs / 'results.md'}", flush=True)
