"""Where a federated run's weights fall behind a centralized one's: `python -m bench.gap FED CENTRAL`.

    python -m bench.gap benchmarks/studies/runs/scale-tiny-2M-spes-s0-<id> \\
                        benchmarks/studies/runs/scale-tiny-2M-central-s0-<id> [--json out.json]

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


def table(result: dict) -> str:
    lines = ["| group | moved, federated | moved, centralized | federated / centralized |", "|---|---:|---:|---:|"]
    rows = [*result["groups"].items(), *((f"experts owned by node {n}", r) for n, r in result["by_owner"].items())]
    for label, r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {label} | {r['federated']:.4f} | {r['centralized']:.4f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gap", description=__doc__.splitlines()[0])
    p.add_argument("federated", type=Path, help="a federated run's folder (run.json, model/)")
    p.add_argument("centralized", type=Path, help="the centralized run of the same preset and seed (model/)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    result = compare(a.federated, a.centralized)
    print(table(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
