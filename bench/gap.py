"""Where a federated run's weights fall behind a centralized one's: `python -m bench.gap FED CENTRAL`.

    python -m bench.gap benchmarks/studies/runs/scale-tiny-2M-spes-s0-<id> \\
                        benchmarks/studies/runs/scale-tiny-2M-central-s0-<id> [--json out.json]
    python -m bench.gap --study scale --arm tiny-2M-spes   # every seed of a study arm and its reference

With --study, each seed's run of the arm is paired with the same seed's run of the arm's reference
(from benchmarks/studies/<study>.json and the run folders still in benchmarks/studies/runs/), and
the figures over seeds go to benchmarks/studies/gap/<study>-<arm>.json, which the study page shows.
Run folders are not committed: where they are gone, run a copy of the study's YAML (same file name)
that holds only the two arms with `python -m bench.study COPY.yaml --out DIR --docs OTHER_DIR`
(on the same machine the same losses; on another close, not bit-equal: see bench/study.py), then
`python -m bench.gap --study NAME --arm ARM --out DIR --json benchmarks/studies/gap/NAME-ARM.json`.

Both runs start from the same model (the same preset and seed: `bench.centralized` builds it as the
coordinator does), and each leaves its final model in `model/`. For every parameter group
(embedding, attention, norms, router, experts, LM head), and for every expert, the distance each
run moved from that start relative to the start's size, ||w - w0|| / ||w0||, and the federated
run's over the centralized run's. A group the federated run moved much less than the centralized
one learned less there. With SPES ownership (the run's strategy_state.json) experts are also
summed by the node that owned them. A movement is not a loss: this locates, it does not attribute.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from bench.runs import ROOT
from common.atomic import write_json_atomic
from model.naming import parse_expert_param

GROUPS = ("embedding", "attention", "norms", "router", "experts", "lm_head")


def group_of(name: str) -> str:
    if parse_expert_param(name) is not None:
        return "experts"
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    if name.endswith("mlp.gate.weight"):
        return "router"
    if "self_attn" in name:
        return "attention"
    raise ValueError(f"parameter {name!r} belongs to no group of {GROUPS}")


def _moved(final: dict[str, torch.Tensor], start: dict[str, torch.Tensor], names) -> float:
    """||w - w0|| / ||w0|| over the named tensors together."""
    delta = sum(float((final[n].double() - start[n].double()).pow(2).sum()) for n in names)
    size = sum(float(start[n].double().pow(2).sum()) for n in names)
    return math.sqrt(delta / size) if size else 0.0


def movement_by_group(final: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, float]:
    names: dict[str, list[str]] = defaultdict(list)
    for n in start:
        names[group_of(n)].append(n)
    return {g: _moved(final, start, names[g]) for g in GROUPS if names[g]}


def movement_by_expert(final: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[int, float]:
    """Expert index -> its movement over every layer."""
    names: dict[int, list[str]] = defaultdict(list)
    for n in start:
        p = parse_expert_param(n)
        if p is not None:
            names[p.expert].append(n)
    return {e: _moved(final, start, names[e]) for e in sorted(names)}


def initial_model(fed_run: Path) -> torch.nn.Module:
    """The model both runs started from, rebuilt from the federated run's recorded config."""
    from model import build_model
    from model.args import MoEArgs

    config = json.loads((fed_run / "run.json").read_text())["config"]
    if config.get("init_from") or config["model"].get("init") != "random":
        raise SystemExit(f"{fed_run}: started from a checkpoint or upcycling; bench.gap rebuilds random inits only")
    vocab = json.loads((fed_run / "model" / "config.json").read_text())["vocab_size"]
    return build_model(MoEArgs(**config["model"]), vocab, seed=config["seed"])


def initial_state(fed_run: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in initial_model(fed_run).state_dict().items()}


def final_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = run / "model" / "model.safetensors"
    if not path.exists():
        raise SystemExit(f"{run}: no model/model.safetensors (a centralized run leaves one since 2026-12-06)")
    return load_file(path)


def owners_of(fed_run: Path) -> dict[str, list[int]]:
    path = fed_run / "strategy_state.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("owners") or {}


def compare(fed_run: Path, central_run: Path) -> dict:
    start = initial_state(fed_run)
    fed, central = final_state(fed_run), final_state(central_run)
    if set(fed) != set(start) or set(central) != set(start):
        raise SystemExit("the two runs' models and the rebuilt start have different parameters: not the same preset")
    groups_central = movement_by_group(central, start)
    groups = {g: (f, groups_central[g]) for g, f in movement_by_group(fed, start).items()}
    experts_fed, experts_central = movement_by_expert(fed, start), movement_by_expert(central, start)
    by_owner = {
        node: (sum(experts_fed[e] for e in owned) / len(owned), sum(experts_central[e] for e in owned) / len(owned))
        for node, owned in owners_of(fed_run).items()
        if owned
    }
    return {
        "groups": {
            g: {"federated": f, "centralized": c, "ratio": f / c if c else None} for g, (f, c) in groups.items()
        },
        "experts": {str(e): {"federated": experts_fed[e], "centralized": experts_central[e]} for e in experts_fed},
        "by_owner": {
            n: {"federated": f, "centralized": c, "ratio": f / c if c else None} for n, (f, c) in by_owner.items()
        },
    }


def study_pairs(out: Path, study: str, arm: str) -> tuple[str, list[tuple[int, Path, Path]]]:
    """The arm's reference, and (seed, federated run, centralized run) for every seed both recorded."""
    from bench.study import cell_run_folder
    from bench.study_report import chosen_cells, reference_arm

    path = out / f"{study}.json"
    if not path.exists():
        raise SystemExit(f"no {path}: run `python -m bench.study {study}` first")
    results = json.loads(path.read_text())
    if arm not in results["arms"]:
        raise SystemExit(f"{path}: no arm {arm!r}; arms: {', '.join(results['arms'])}")
    ref = reference_arm(results, arm)
    by_arm = chosen_cells(results)
    if ref is None or arm not in by_arm or ref not in by_arm:
        raise SystemExit(f"{path}: arm {arm!r} and its reference ({ref}) have no recorded cells to pair")
    refs = {c["seed"]: c for c in by_arm[ref]}
    return ref, [
        (c["seed"], cell_run_folder(out, study, c), cell_run_folder(out, study, refs[c["seed"]]))
        for c in by_arm[arm]
        if c["seed"] in refs
    ]


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Rows in model order (each group, then the least- and most-moved owner's experts) with each
    seed's federated and centralized movement and their ratio, as lists in seed order. A list, not a
    mapping: the JSON is written with sorted keys and the page keeps this order."""
    seeds = sorted(per_seed)
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        result = per_seed[seed]
        owners = sorted(result["by_owner"].values(), key=lambda r: r["ratio"])
        labelled = [*result["groups"].items()]
        if owners:
            labelled += [("experts, least-moved owner", owners[0]), ("experts, most-moved owner", owners[-1])]
        for label, r in labelled:
            row = rows.setdefault(label, {"federated": [], "centralized": [], "ratio": []})
            for k in row:
                row[k].append(r[k])
    return {"seeds": seeds, "rows": [{"label": label, **row} for label, row in rows.items()]}


def gap_over_seeds(out: Path, study: str, arm: str) -> dict:
    ref, pairs = study_pairs(out, study, arm)
    missing = [str(p) for _, fed, central in pairs for p in (fed, central) if not (p / "model").is_dir()]
    if missing:
        raise SystemExit(
            f"no final model in {', '.join(missing)} (run folders are not committed): run a copy of the study "
            f"YAML holding only {arm} and {ref} with --out DIR, then bench.gap --out DIR"
        )
    per_seed, final = {}, {"federated": [], "centralized": []}
    for seed, fed, central in pairs:
        print(f"[gap] {study} {arm} seed {seed}", flush=True)
        per_seed[seed] = compare(fed, central)
        for side, run in (("federated", fed), ("centralized", central)):
            final[side].append(json.loads((run / "summary.json").read_text())["final_val_loss"])
    return {
        "study": study,
        "arm": arm,
        "reference": ref,
        "final_val_loss": final,
        **over_seeds(per_seed),
        "per_seed": {str(s): r for s, r in per_seed.items()},
    }


def table(result: dict) -> str:
    lines = ["| group | moved, federated | moved, centralized | federated / centralized |", "|---|---:|---:|---:|"]
    rows = [*result["groups"].items(), *((f"experts owned by node {n}", r) for n, r in result["by_owner"].items())]
    for label, r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {label} | {r['federated']:.4f} | {r['centralized']:.4f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("federated", type=Path, nargs="?", help="a federated run's folder (run.json, model/)")
    p.add_argument("centralized", type=Path, nargs="?", help="the centralized run of the same preset and seed")
    p.add_argument("--study", help="pair every seed of a study arm with its reference instead")
    p.add_argument("--arm", help="with --study: the federated arm")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "studies", help="with --study: its folder")
    p.add_argument("--json", type=Path, help="also write the figures here (with --study: <out>/gap/<study>-<arm>.json)")
    a = p.parse_args(argv)
    if a.study:
        from bench.study_report import gap_section

        if not a.arm or a.federated:
            p.error("--study takes --arm and no run folders")
        summary = gap_over_seeds(a.out, a.study, a.arm)
        print("\n".join(gap_section([summary])).strip())
        path = a.json or a.out / "gap" / f"{a.study}-{a.arm}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, summary)
        print(f"[gap] {path}")
        return 0
    if not a.centralized:
        p.error("give a federated and a centralized run folder, or --study and --arm")
    result = compare(a.federated, a.centralized)
    print(table(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
