"""Runs the benchmarks are made of: one federated run through `python -m sim` (in-process by default),
and the figures a results file records of it (losses, tokens, bytes against the analytic counts),
with every path made relative so that committed results name no machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from server_app.report import read_rounds
from strategy.round_record import RoundRecord

ROOT = Path(__file__).resolve().parent.parent
BYTES_FP32 = 4
# Delta sync with compressed differences both ways (issues 11 and 26): name -> overrides.
_TOPK2 = ["strategy.delta_sync=true", "strategy.uplink_codec=topk2", "strategy.downlink_codec=topk2"]
VARIANT_METHODS = {
    "spes_int8": [
        "strategy=spes",
        "strategy.delta_sync=true",
        "strategy.uplink_codec=int8",
        "strategy.downlink_codec=int8",
        "strategy.error_feedback=true",
    ],
    "spes_bf16": [
        "strategy=spes",
        "strategy.delta_sync=true",
        "strategy.uplink_codec=bf16",
        "strategy.downlink_codec=bf16",
    ],
    # SparseLoCo's setting (arXiv 2508.15706): 1/64 of each 4096-chunk, 2 or 4 bits.
    "spes_topk2": ["strategy=spes", *_TOPK2],
    "spes_topk4": [
        "strategy=spes",
        "strategy.delta_sync=true",
        "strategy.uplink_codec=topk4",
        "strategy.downlink_codec=topk4",
    ],
    "diloco_topk2": ["strategy=diloco", *_TOPK2],  # the same without expert ownership
    # Partial residency (issue 25): a node holds only its experts, or those and 2 more per layer.
    "spes_owned": ["strategy=spes", "strategy.residency=owned"],
    "spes_owned2": ["strategy=spes", "strategy.residency=owned+2"],
    # Streaming fragments (issue 26, Streaming DiLoCo without the overlap): one of 4 layer
    # fragments synced a round, so each fragment every 4 rounds.
    "spes_fragments4": ["strategy=spes", "strategy.delta_sync=true", "strategy.fragments=4"],
}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """Hydra overrides with later ones replacing earlier ones of the same key."""
    out: dict[str, str] = {}
    for ov in [*base, *extra]:
        out.pop(_key(ov), None)
        out[_key(ov)] = ov
    return list(out.values())


def relative_path(path: Path, base: Path) -> str:
    """`path` relative to the folder `base` (POSIX form), as results files record paths."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def portable_arg(arg: str) -> str:
    """A command-line argument (or key=value) naming a path inside the project, made root-relative.

    Keeps a recorded command free of the machine's checkout path; paths outside the project
    (a scratch --out) are left as given.
    """
    key, sep, value = arg.partition("=") if "=" in arg else ("", "", arg)
    if Path(value).is_absolute():
        with contextlib.suppress(ValueError):
            value = Path(value).resolve().relative_to(ROOT).as_posix() or "."
    return key + sep + value


# An absolute POSIX path, a home-relative path or a Windows drive path, at the start of a string
# or after a separator (so "a / b" and "x/y" do not count).
_ABSOLUTE = re.compile(r"""(?:^|[\s='"`(,])(/[^\s/]|~[/\\]|[A-Za-z]:[\\/])""")


def absolute_paths(obj, where: str = "") -> list[tuple[str, str]]:
    """(location, string) of every key or string value in a JSON tree that holds an absolute path."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            at = f"{where}.{k}" if where else str(k)
            if _ABSOLUTE.search(str(k)):
                found.append((at, str(k)))
            found += absolute_paths(v, at)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += absolute_paths(v, f"{where}[{i}]")
    elif isinstance(obj, str) and _ABSOLUTE.search(obj):
        found.append((where, obj))
    return found


def read_run(run_dir: Path) -> tuple[dict, list[RoundRecord]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, read_rounds(run_dir)


def owned_per_node(overrides: list[str]) -> int:
    """m: experts trained by the busiest node (analytic bytes use it)."""
    from server_app.config import load
    from strategy.assignment import make_assignment

    spec = load(overrides)
    own = make_assignment(spec.strategy.assignment, spec.model.num_experts, spec.nodes)
    return max(len(o) for o in own.owners)


def traffic_per_node(metrics: list[RoundRecord]) -> dict[str, float | None]:
    """A node's bytes up + down in a steady round (after a round without a merge: no first contact,
    no merged experts), mean over those rounds and nodes, and the largest exchange of any node after
    round 1 (which downloads the whole model for every method)."""
    steady = [
        n["bytes_up"] + n["bytes_down"]
        for prev, r in zip(metrics, metrics[1:])
        if prev.merge_alpha == 0
        for n in r.nodes.values()
    ]
    later = [n["bytes_up"] + n["bytes_down"] for r in metrics[1:] for n in r.nodes.values()]
    return {
        "bytes_steady_round_node": sum(steady) / len(steady) if steady else None,
        "bytes_peak_round_node": max(later) if later else None,
    }


def bytes_entry(summary: dict, metrics: list[RoundRecord], owned: int, analytic: bool = True) -> dict:
    """Measured per-node bytes (all rounds, steady state) beside the analytic fp32 values
    (`analytic=False` for compressed runs: no fp32 formula applies). Bytes are the encoded
    tensor payload; `wire_*` add each array's serialisation header, as sent.

    Steady state = rounds after a non-merge round: no first contact, no merged experts, so a
    SPES node gets everything but its own experts. Round 1 and rounds after a merge send the
    full model down.
    """
    total, shared, per = summary["total_params"], summary["shared_params"], summary["params_per_expert"]
    replicated = owned * per + shared >= total  # every expert trained here: DiLoCo / FedAvg
    up = BYTES_FP32 * (shared + owned * per)
    down_steady = BYTES_FP32 * (total if replicated else total - owned * per)
    down_full = BYTES_FP32 * total
    steady = [r for prev, r in zip(metrics, metrics[1:]) if prev.merge_alpha == 0]
    full_round = [True] + [prev.merge_alpha > 0 for prev in metrics[:-1]]

    def per_node(rounds: list[RoundRecord], key: str) -> float | None:
        vals = [n[key] for r in rounds for n in r.nodes.values()]
        return sum(vals) / len(vals) if vals else None

    up_s, down_s = per_node(steady, "bytes_up"), per_node(steady, "bytes_down")
    has_wire = all("wire_bytes_up" in n for r in metrics for n in r.nodes.values())
    wire_s = (per_node(steady, "wire_bytes_up") or 0.0) + (per_node(steady, "wire_bytes_down") or 0.0)
    wire = (
        {
            "wire_bytes_steady_per_round_node": wire_s if steady else None,
            "wire_bytes_per_round_node": per_node(metrics, "wire_bytes_up") + per_node(metrics, "wire_bytes_down"),
        }
        if has_wire and metrics
        else {}
    )
    entry = {
        "bytes_up_per_round_node": summary["bytes_up_per_round_node"],  # all rounds
        "bytes_down_per_round_node": summary["bytes_down_per_round_node"],
        "bytes_up_steady_per_round_node": up_s,
        "bytes_down_steady_per_round_node": down_s,
        "bytes_steady_per_round_node": None if up_s is None else up_s + down_s,
        "steady_rounds": [r.round for r in steady],
        **wire,
        "analytic": {
            "owned_experts": owned,
            "bytes_up_per_round_node": up,
            "bytes_down_steady_per_round_node": down_steady,
            "bytes_down_full_per_round_node": down_full,
            "bytes_steady_per_round_node": up + down_steady,
            "bytes_down_per_round_node_all_rounds": sum(down_full if f else down_steady for f in full_round)
            / len(full_round),
        },
    }
    if not analytic:
        entry.pop("analytic")
    return entry


def method_entry(run_dir: Path, owned: int | None, base: Path, analytic: bool = True) -> dict:
    """One run's figures; `run_dir` is recorded relative to `base`, the folder of the results file."""
    summary, metrics = read_run(run_dir)
    tokens = [0.0]
    for r in metrics:
        tokens.append(tokens[-1] + r.tokens)
    entry = {
        "run_dir": relative_path(run_dir, base),
        "first_val_loss": summary["first_val_loss"],
        "final_val_loss": summary["final_val_loss"],
        "val_loss_by_round": summary["val_loss_by_round"],
        "tokens_by_round": tokens,
        "tokens_trained": summary["tokens_trained"],
        "peak_mem_mb_node": summary["peak_mem_mb_node"],
        "tokens_per_s_node": summary["tokens_per_s_node"],
        "trainable_params_node": summary["trainable_params_node"],
        "total_params": summary["total_params"],
        "wall_s": summary["wall_s"],
        "bytes_up_per_round_node": summary["bytes_up_per_round_node"],
        "bytes_down_per_round_node": summary["bytes_down_per_round_node"],
        # What the robustness defaults did to these honest runs (docs/robustness.md); absent before they existed.
        "clipped_updates": summary.get("clipped_updates"),
        "guard_dropped_updates": summary.get("guard_dropped_updates"),
    }
    if owned is not None:
        entry.update(bytes_entry(summary, metrics, owned, analytic))
        entry["bytes_peak_round_node"] = traffic_per_node(metrics)["bytes_peak_round_node"]
        entry["bytes_per_round_node"] = [
            sum(n["bytes_up"] + n["bytes_down"] for n in r.nodes.values()) / len(r.nodes) for r in metrics
        ]
    return entry


def run_federated(method: str, overrides: list[str], runs_dir: Path, run_name: str) -> Path:
    from engine.simulate import simulate as sim_main

    ov = merge_overrides(
        overrides,
        [*VARIANT_METHODS.get(method, [f"strategy={method}"]), f"run_name={run_name}", f"output_dir={runs_dir}"],
    )
    print(f"[bench] {method}: python -m sim {' '.join(ov)}", flush=True)
    rc = sim_main(ov)
    if rc != 0:
        raise RuntimeError(f"{method} simulation failed (exit {rc}); logs under {runs_dir / run_name}")
    return runs_dir / run_name
