"""Benchmark harness: SPES vs DiLoCo vs FedAvg vs centralized, at one token budget.

    python -m bench                       # the default benchmark (make bench), ~17 min on 2 CPUs
    python -m bench rounds=8 model=tiny   # Hydra overrides apply to every method
    python -m bench --ablation merge      # merge | H | nodes | iid | all  -> docs/results.md

The default benchmark runs the federated strategies (`python -m sim` with strategy=spes|diloco|fedavg
and SPES with int8 / bf16 delta sync) through the in-process engine (`--engine flower` for Flower
simulations: the same numbers bit for bit, tests/test_engines.py) and the centralized baseline
(`python -m bench.centralized`) with the same model, data, seed and tokens; then measures per-node
memory for the paper's 4 x 4 ratio (`model=small`, bench.memory) and the Flower overhead on short
SPES Flower simulations (bench.overhead). It writes <out>/results.json, <docs>/benchmarks.md and three plots. Every ratio
is computed here from measured values; `ratio_sources` in results.json names its inputs.

Results files are committed, so every path in one is relative to the folder holding that file
(`run_dir`: "runs/bench-spes" in results.json, "../runs/abl-..." in ablations/<name>.json): they
name no machine and resolve on any checkout. The report is rendered from bench/templates/ against
the goals in conf/bench/goals.yaml (bench.report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from server_app.report import read_rounds
from strategy.round_record import RoundRecord

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("spes", "diloco", "fedavg")
# SPES with delta sync and compressed differences both ways (issue 11): name -> overrides.
CODEC_METHODS = {
    "spes_int8": ["strategy=spes", "strategy.delta_sync=true", "strategy.uplink_codec=int8",
                  "strategy.downlink_codec=int8", "strategy.error_feedback=true"],
    "spes_bf16": ["strategy=spes", "strategy.delta_sync=true", "strategy.uplink_codec=bf16",
                  "strategy.downlink_codec=bf16"],
}
# tiny model, 4 nodes x 4 experts, 16 rounds x H=25 = 400 steps: finishes well inside 30 min on 2 CPUs.
DEFAULTS = ["model=tiny", "nodes=4", "rounds=16", "strategy.local_steps=25"]
BYTES_FP32 = 4

# ratio -> (numerator, denominator): dotted paths into results.json.
RATIO_SOURCES = {
    "mem_spes_over_diloco": ("memory.spes.peak_rss_mb", "memory.diloco.peak_rss_mb"),
    "bytes_spes_over_diloco": (
        "methods.spes.bytes_steady_per_round_node", "methods.diloco.bytes_steady_per_round_node"),
    "loss_spes_over_centralized": ("methods.spes.final_val_loss", "methods.centralized.final_val_loss"),
    "loss_spes_over_diloco": ("methods.spes.final_val_loss", "methods.diloco.final_val_loss"),
    "flower_overhead": ("overhead.sim_round_s", "overhead.bare_round_s"),
    "bytes_spes_int8_over_diloco_fp32": (
        "methods.spes_int8.bytes_steady_per_round_node", "methods.diloco.bytes_steady_per_round_node"),
    "loss_spes_int8_over_spes_fp32": ("methods.spes_int8.final_val_loss", "methods.spes.final_val_loss"),
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
        try:
            value = Path(value).resolve().relative_to(ROOT).as_posix() or "."
        except ValueError:
            pass
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


def lookup(results: dict, path: str):
    node = results
    for part in path.split("."):
        node = node[part]
    return node


def compute_ratios(results: dict) -> dict[str, float]:
    """Every ratio whose inputs the results hold (results from before a method existed lack its ratios)."""
    out = {}
    for k, (num, den) in RATIO_SOURCES.items():
        try:
            out[k] = lookup(results, num) / lookup(results, den)
        except KeyError:
            continue
    return out


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
    wire = {"wire_bytes_steady_per_round_node": wire_s if steady else None,
            "wire_bytes_per_round_node": per_node(metrics, "wire_bytes_up") + per_node(metrics, "wire_bytes_down")
            } if has_wire and metrics else {}
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
    }
    if owned is not None:
        entry.update(bytes_entry(summary, metrics, owned, analytic))
        entry["bytes_per_round_node"] = [
            sum(n["bytes_up"] + n["bytes_down"] for n in r.nodes.values()) / len(r.nodes) for r in metrics
        ]
    return entry


def run_federated(method: str, overrides: list[str], runs_dir: Path, run_name: str) -> Path:
    from engine.simulate import simulate as sim_main

    ov = merge_overrides(overrides, [*CODEC_METHODS.get(method, [f"strategy={method}"]), f"run_name={run_name}",
                                     f"output_dir={runs_dir}"])
    print(f"[bench] {method}: python -m sim {' '.join(ov)}", flush=True)
    rc = sim_main(ov)
    if rc != 0:
        raise RuntimeError(f"{method} simulation failed (exit {rc}); logs under {runs_dir / run_name}")
    return runs_dir / run_name


def flower_overhead(spes_ov: list[str], runs: Path, bare_rounds: int, overhead_h: tuple[int, ...],
                    overhead_rounds: int, stamp) -> dict:
    """Flower simulation rounds against the bare loop: short SPES runs on Flower (engine=flower) at the
    bench's H (the headline) and at each of `overhead_h` (the per-round costs Flower adds are fixed, so
    the ratio depends on H; the reference uses H = 100). Round 1 (start-up) is not timed."""
    from bench import overhead

    def at(extra: list[str], name: str) -> dict:
        ov = merge_overrides(spes_ov, [*extra, f"rounds={overhead_rounds}", "engine=flower", f"run_name={name}"])
        print(f"[bench] Flower overhead, {name} ({stamp()})", flush=True)
        return overhead.measure(ov, read_run(run_federated("spes", ov, runs, name))[1], bare_rounds)

    over = at([], "bench-overhead")
    over["at_local_steps"] = {}
    for h in overhead_h:
        res = at([f"strategy.local_steps={h}"], f"bench-overhead-H{h}")
        over["at_local_steps"][str(h)] = {k: res[k] for k in (
            "sim_round_s", "bare_round_s", "flower_overhead", "sim_over_local_round", "unaccounted_s")}
    return over


def run_benchmark(overrides: list[str], out: Path, docs: Path, memory_overrides: list[str],
                  memory_shape: tuple[int, int, int], bare_rounds: int, command: str,
                  overhead_h: tuple[int, ...] = (), overhead_rounds: int = 3) -> dict:
    from bench import centralized, memory
    from bench.report import machine_info, write_bench_docs

    t0 = time.time()
    runs = out / "runs"
    stamp = lambda: f"{(time.time() - t0) / 60:.1f} min"  # noqa: E731
    methods = {}
    for m in (*METHODS, *CODEC_METHODS):
        ov = merge_overrides(overrides, CODEC_METHODS.get(m, [f"strategy={m}"]))
        run_dir = run_federated(m, overrides, runs, f"bench-{m}")
        methods[m] = method_entry(run_dir, owned_per_node(ov), out, analytic=m not in CODEC_METHODS)
        print(f"[bench] {m} done ({stamp()}): final held-out loss {methods[m]['final_val_loss']:.4f}", flush=True)

    cen_ov = merge_overrides(overrides, ["run_name=bench-centralized", f"output_dir={runs}"])
    print(f"[bench] centralized: python -m bench.centralized {' '.join(cen_ov)}", flush=True)
    centralized.run(cen_ov)
    methods["centralized"] = method_entry(runs / "bench-centralized", None, out)
    print(f"[bench] centralized done ({stamp()})", flush=True)

    print(f"[bench] memory: {' '.join(memory_overrides)} ({stamp()})", flush=True)
    mem = memory.measure(memory_overrides, *memory_shape)

    spes_ov = merge_overrides(overrides, ["strategy=spes", f"output_dir={runs}"])
    over = flower_overhead(spes_ov, runs, bare_rounds, overhead_h, overhead_rounds, stamp)
    results = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "overrides": [portable_arg(o) for o in overrides],
        "runs_dir": relative_path(runs, out),
        "methods": methods,
        "memory": mem,
        "overhead": over,
        "ratio_sources": {k: list(v) for k, v in RATIO_SOURCES.items()},
    }
    results["ratios"] = compute_ratios(results)
    spes_a, dil_a = methods["spes"]["analytic"], methods["diloco"]["analytic"]
    results["analytic_ratios"] = {
        "bytes_spes_over_diloco": spes_a["bytes_steady_per_round_node"] / dil_a["bytes_steady_per_round_node"],
        "mem_floor_spes_over_diloco": mem["ratio_analytic_floor"],
    }
    results["bench_wall_s"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    write_bench_docs(results, docs, out / "results.json")
    print(f"[bench] done in {stamp()}: {out / 'results.json'}, {docs / 'benchmarks.md'}", flush=True)
    for k, v in results["ratios"].items():
        print(f"[bench]   {k} = {v:.4f}", flush=True)
    return results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablation", choices=["merge", "H", "nodes", "iid", "all"],
                   help="run an ablation instead of the main benchmark (writes docs/results.md)")
    p.add_argument("--out", default="benchmarks", help="results.json and runs/ go here")
    p.add_argument("--docs", default="docs", help="benchmarks.md / results.md and plots go here")
    p.add_argument("--memory-overrides", default="model=small",
                   help="Hydra overrides for the memory measurement (default: the paper's 4 x 4 ratio)")
    p.add_argument("--memory-batch", type=int, default=4)
    p.add_argument("--memory-seq", type=int, default=128)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--bare-rounds", type=int, default=3, help="bare-loop rounds for the overhead (first is warm-up)")
    p.add_argument("--overhead-h", type=int, nargs="*", default=[100],
                   help="also measure the Flower overhead at these H (short SPES runs); none: skip")
    p.add_argument("--engine", choices=["inprocess", "flower"], default="inprocess",
                   help="how the federated methods run (bit-identical results; the Flower overhead is always "
                        "measured on Flower simulations)")
    p.add_argument("--overhead-rounds", type=int, default=3,
                   help="rounds of each --overhead-h run (round 1 is start-up and is not timed)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the docs and plots from an existing <out>/results.json "
                        "(and docs/results.md from <out>/ablations/*.json, when there are any)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method")
    a = p.parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(portable_arg(x)) for x in argv)
    overrides = merge_overrides([*DEFAULTS, f"engine={a.engine}"], a.overrides)
    out, docs = Path(a.out).resolve(), Path(a.docs).resolve()
    if a.report_only:
        from bench.ablations import ABLATIONS, write_results_md
        from bench.report import write_bench_docs

        results_path = out / "results.json"
        if not results_path.exists():
            print(f"--report-only: no {results_path}; run the benchmark first", file=sys.stderr)
            return 2
        print(write_bench_docs(json.loads(results_path.read_text()), docs, results_path))
        if any((out / "ablations" / f"{name}.json").exists() for name in ABLATIONS):
            print(write_results_md(out, docs))
        return 0
    if a.ablation:
        from bench.ablations import run_ablations

        run_ablations(a.ablation, overrides, out, docs)
        return 0
    mem_ov = shlex.split(a.memory_overrides)
    run_benchmark(overrides, out, docs, mem_ov, (a.memory_batch, a.memory_seq, a.memory_steps), a.bare_rounds, command,
                  tuple(a.overhead_h), a.overhead_rounds)
    return 0
