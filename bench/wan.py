"""`python -m bench.wan`: wall-clock time to a target held-out loss over a wide-area network, modelled.

    python -m bench.wan                       # from benchmarks/studies/parity.json -> docs/wan.md, docs/wan.png
    python -m bench.wan --latency-ms 50 --step-1b-s 0.44

Nothing here is measured on a network: the page is a model whose every input is printed beside the
result. For each method (SPES fp32, SPES with int8 delta sync, DiLoCo, FedAvg, and data-parallel
training over the same links) and each link speed:

- rounds to the target: read off the method's mean held-out loss curve of the parity study (the
  number of syncs it took to reach the target loss, linearly interpolated between rounds);
  data-parallel training follows the centralized curve at the same tokens (it is the same math);
- one round: H local steps of the node's step time plus the round's traffic over the link (bytes
  up, then down, at the link speed, no overlap with compute, one round trip of latency each way);
  data-parallel pays a ring all-reduce of the fp32 gradients every step (2 (N - 1) / N of the
  gradient bytes per node, 2 (N - 1) latencies);
- bytes per round at the 1b and 7b presets from their parameter counts (fp32, owned experts per
  the contiguous assignment); int8 and top-k delta sync scale SPES fp32's steady bytes by the ratio
  measured on the tiny model (benchmarks/results.json), and its syncs by the ratio of syncs to a
  common target in the compression study (benchmarks/studies/compression.json), assumptions stated
  on the page;
- step time: a SPES node's measured tokens/s in benchmarks/gpu.json (scripts/gpu_check.sh, "runs") over
  the recipe's tokens per step when it holds the preset, else an assumption (default 1b: 0.44 s per
  step, the figure the resident-worker issue quotes for an H200 at 4 x 2048 tokens; 7b: 1b's scaled
  by training FLOPs per step of the recipes, i.e. the same FLOP/s).

The target is the worst of the compared methods' final mean losses, so that every method reaches it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.runs import ROOT
from bench.study_report import chosen_cells
from common.atomic import write_json_atomic

LINKS_BPS = {"100 Mbit/s": 100e6, "1 Gbit/s": 1e9, "10 Gbit/s": 10e9}
PRESETS = ("1b", "7b")
H_AT_SCALE = 100  # the paper's sync interval; the study's curves count syncs, not steps
METHODS = ("spes", "spes_int8", "spes_topk2", "diloco", "fedavg", "data_parallel")
# SPES with a delta-sync codec -> its arm in the compression study (conf/study/compression.yaml).
COMPRESSED = {"spes_int8": "spes-int8", "spes_topk2": "spes-topk2"}


def preset_bytes(preset: str, nodes: int = 4) -> dict[str, float]:
    """Per node and round (steady state): bytes up and down for SPES and full-model methods (fp32)."""
    from model.args import build_config, count_parameters
    from server_app.config import load
    from strategy.assignment import make_assignment

    spec = load([f"model={preset}", f"nodes={nodes}"])
    c = count_parameters(build_config(spec.model, spec.model.vocab_size or spec.data.vocab_size))
    owned = max(len(o) for o in make_assignment("contiguous", spec.model.num_experts, nodes).owners)
    return {
        "total_params": c["total"],
        "spes_up": 4.0 * (c["shared"] + owned * c["per_expert"]),
        "spes_down": 4.0 * (c["total"] - owned * c["per_expert"]),
        "full_up": 4.0 * c["total"],
        "full_down": 4.0 * c["total"],
    }


def rounds_to(curve: list[float], target: float) -> float | None:
    """Syncs until the loss curve (index = round, 0 = before training) first reaches `target`."""
    for r in range(1, len(curve)):
        if curve[r] <= target:
            prev = curve[r - 1]
            return r - 1 + (prev - target) / (prev - curve[r]) if prev > curve[r] else float(r)
    return None


def mean_curve(cells: list[dict]) -> list[float]:
    n = min(len(c["val_loss_by_round"]) for c in cells)
    return [statistics.fmean(c["val_loss_by_round"][j] for c in cells) for j in range(n)]


def codec_sync_ratios(compression: dict | None) -> dict[str, float]:
    """Per compressed method, its syncs to a common target over SPES fp32's, on the compression
    study's mean curves (the target: the worst final mean loss of SPES fp32 and the codecs' arms)."""
    if compression is None:
        return {}
    by_arm = chosen_cells(compression)
    arms = {m: a for m, a in COMPRESSED.items() if a in by_arm and by_arm[a]}
    if "spes" not in by_arm or not arms:
        return {}
    curves = {m: mean_curve(by_arm[a]) for m, a in {"spes": "spes", **arms}.items()}
    target = max(c[-1] for c in curves.values())
    base = rounds_to(curves["spes"], target)
    return {m: rounds_to(curves[m], target) / base for m in arms if base and rounds_to(curves[m], target)}


def model_rows(
    parity: dict,
    byte_ratios: dict[str, float],
    sync_ratios: dict[str, float],
    step_s: dict[str, float],
    latency_s: float,
    nodes: int,
) -> dict:
    """Hours to the target per preset, link and method. A compressed SPES method sends SPES fp32's
    bytes x its measured byte ratio and needs SPES fp32's syncs x its sync ratio (1 without the study)."""
    by_arm = chosen_cells(parity)
    curves = {m: mean_curve(by_arm[m]) for m in ("spes", "diloco", "fedavg", "centralized") if m in by_arm}
    target = max(c[-1] for c in curves.values())
    syncs = {m: rounds_to(c, target) for m, c in curves.items()}
    for m in byte_ratios:
        syncs[m] = None if syncs.get("spes") is None else syncs["spes"] * sync_ratios.get(m, 1.0)
    methods = [m for m in METHODS if m not in COMPRESSED or m in byte_ratios]
    rows = {}
    for preset in PRESETS:
        b = preset_bytes(preset, nodes)
        for link, bps in LINKS_BPS.items():
            for method in methods:
                rows[f"{preset} | {link} | {method}"] = _time(
                    method, b, bps, latency_s, step_s[preset], syncs, byte_ratios, nodes
                )
    return {
        "target_loss": target,
        "syncs_to_target": syncs,
        "rows": rows,
        "links": list(LINKS_BPS),
        "methods": methods,
        "presets": list(PRESETS),
    }


def _time(method, b, bps, latency_s, step_s, syncs, byte_ratios, nodes) -> dict:
    compute = H_AT_SCALE * step_s
    if method == "data_parallel":
        steps = None if syncs.get("centralized") is None else syncs["centralized"] * H_AT_SCALE
        comm = 2 * (nodes - 1) / nodes * b["full_up"] * 8 / bps + 2 * (nodes - 1) * latency_s
        per = step_s + comm
        hours = None if steps is None else steps * per / 3600
        return {"round_s": per * H_AT_SCALE, "comm_share": comm / per, "hours": hours}
    up, down = (b["spes_up"], b["spes_down"]) if method.startswith("spes") else (b["full_up"], b["full_down"])
    if method in byte_ratios:
        up, down = up * byte_ratios[method], down * byte_ratios[method]
    comm = (up + down) * 8 / bps + 2 * latency_s
    per = compute + comm
    s = syncs.get(method)
    return {"round_s": per, "comm_share": comm / per, "hours": None if s is None else s * per / 3600}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parity", default=str(ROOT / "benchmarks" / "studies" / "parity.json"))
    p.add_argument("--compression", default=str(ROOT / "benchmarks" / "studies" / "compression.json"))
    p.add_argument("--latency-ms", type=float, default=50.0, help="one-way latency of each link")
    p.add_argument("--step-1b-s", type=float, default=0.44, help="seconds per 1b step when gpu.json has none")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--fragments", type=int, default=4, help="streaming fragments of the clock table")
    p.add_argument("--overlap-steps", type=int, default=5, help="steps each fragment's exchange may hide behind")
    a = p.parse_args(argv)
    parity = json.loads(Path(a.parity).read_text())
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    fp32 = results["methods"]["spes"]["bytes_steady_per_round_node"]
    byte_ratios = {
        m: results["methods"][m]["bytes_steady_per_round_node"] / fp32 for m in COMPRESSED if m in results["methods"]
    }
    compression_path = Path(a.compression)
    compression = json.loads(compression_path.read_text()) if compression_path.exists() else None
    sync_ratios = codec_sync_ratios(compression)
    step_s = {"1b": a.step_1b_s, "7b": a.step_1b_s * _flops_per_step_ratio()}
    measured = gpu_step_seconds(ROOT / "benchmarks" / "gpu.json")
    step_source = {k: "benchmarks/gpu.json" if k in measured else "assumed" for k in PRESETS}
    step_s.update(measured)
    out = model_rows(parity, byte_ratios, sync_ratios, step_s, a.latency_ms / 1e3, a.nodes)
    out["assumptions"] = {
        "latency_s": a.latency_ms / 1e3,
        "step_s": step_s,
        "step_source": step_source,
        "bytes_over_spes_fp32": byte_ratios,
        "syncs_over_spes_fp32": sync_ratios,
        "compression": compression_path.name if compression is not None else None,
        "H": H_AT_SCALE,
        "nodes": a.nodes,
        "parity": str(Path(a.parity).name),
    }
    out["streaming"] = streaming_rows(step_s, a.latency_ms / 1e3, a.nodes, a.fragments, a.overlap_steps)
    write_json_atomic(ROOT / "benchmarks" / "wan.json", out)
    from bench.wan_report import write_wan_page

    print(f"[wan] {write_wan_page(out, ROOT / 'docs')}")
    return 0


def streaming_rows(step_s: dict[str, float], latency_s: float, nodes: int, fragments: int, overlap: int) -> dict:
    """bench/wan_streaming.py's clock per preset and link: seconds per H steps, peak exchange."""
    from bench.wan_streaming import fragment_exchange_bytes, streaming_clock

    rows = {}
    for preset in PRESETS:
        b = preset_bytes(preset, nodes)
        exchanges = fragment_exchange_bytes(preset, fragments, nodes)
        for link, bps in LINKS_BPS.items():
            rows[f"{preset} | {link}"] = streaming_clock(
                exchanges, b["spes_up"] + b["spes_down"], step_s[preset], bps, latency_s, H_AT_SCALE, overlap
            )
    return {"fragments": fragments, "overlap_steps": overlap, "H": H_AT_SCALE, "rows": rows}


def gpu_step_seconds(path: Path) -> dict[str, float]:
    """Seconds per recipe step of a SPES node per preset, from scripts/gpu_check.sh's rows (plain
    loss): the row's tokens/s over the recipe's tokens per step (train.batch_size x data.seq_len). The
    suite's batches are smaller than the recipes' (4 and 2 sequences against 8), so this is the
    slower side: a GPU's tokens/s rarely falls with the batch."""
    if not path.exists():
        return {}
    from server_app.config import load

    rows = json.loads(path.read_text()).get("runs", [])
    out = {}
    for r in rows:
        if r.get("mode") == "spes" and not r.get("lean") and r.get("tokens_per_s") and r.get("size") in PRESETS:
            spec = load([f"recipe={r['size']}"])
            out[r["size"]] = spec.train.batch_size * spec.data.seq_len / r["tokens_per_s"]
    return out


def _flops_per_step_ratio() -> float:
    """7b / 1b training FLOPs per step (each preset's recipe batch and sequence), same throughput."""
    from bench.study_cost import training_flops
    from server_app.config import load

    f = {}
    for preset in PRESETS:
        spec = load([f"recipe={preset}"])
        f[preset] = training_flops(spec, spec.train.batch_size * spec.data.seq_len)
    return f["7b"] / f["1b"]


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
