"""Benchmark harness: SPES vs DiLoCo vs FedAvg vs centralized, at one token budget.

    python -m bench                       # the default benchmark (make bench), ~17 min on 2 CPUs
    python -m bench rounds=8 model=tiny   # Hydra overrides apply to every method
    python -m bench --ablation merge      # merge | H | nodes | iid | all  -> docs/results.md
    python -m bench --add spes_topk2      # run methods (comma-separated) into benchmarks/results.json

The default benchmark runs the federated strategies (`python -m sim` with strategy=spes|diloco|fedavg,
SPES with int8 / bf16 / top-k delta sync and DiLoCo with top-k) through the in-process engine
(`--engine flower` for Flower simulations: the same numbers bit for bit, tests/test_engines.py)
and the centralized baseline (`python -m bench.centralized`) with the same model, data, seed and
tokens; then measures per-node memory for the paper's 4 x 4 ratio (`model=small`, bench.memory)
and the Flower overhead on short SPES Flower simulations (bench.overhead). It writes
<out>/results.json, <docs>/benchmarks.md and three plots. Every ratio is computed here from
measured values; `ratio_sources` in results.json names its inputs.

Results files are committed, so every path in one is relative to the folder holding that file
(`run_dir`: "runs/bench-spes" in results.json, "../runs/abl-..." in ablations/<name>.json): they
name no machine and resolve on any checkout. The report is rendered from bench/templates/ against
the goals in conf/bench/goals.yaml (bench.report).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.report import RATIO_SOURCES, compute_ratios
from bench.runs import (
    VARIANT_METHODS,
    merge_overrides,
    method_entry,
    owned_per_node,
    portable_arg,
    read_run,
    relative_path,
    run_federated,
)
from server_app.provenance import code_commit

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("spes", "diloco", "fedavg")
# tiny model, 4 nodes x 4 experts, 16 rounds x H=25 = 400 steps: finishes well inside 30 min on 2 CPUs.
DEFAULTS = ["model=tiny", "nodes=4", "rounds=16", "strategy.local_steps=25"]


def flower_overhead(
    spes_ov: list[str], runs: Path, bare_rounds: int, overhead_h: tuple[int, ...], overhead_rounds: int, stamp
) -> dict:
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
        over["at_local_steps"][str(h)] = {
            k: res[k]
            for k in ("sim_round_s", "bare_round_s", "flower_overhead", "sim_over_local_round", "unaccounted_s")
        }
    return over


def run_benchmark(
    overrides: list[str],
    out: Path,
    docs: Path,
    memory_overrides: list[str],
    memory_shape: tuple[int, int, int],
    bare_rounds: int,
    command: str,
    overhead_h: tuple[int, ...] = (),
    overhead_rounds: int = 3,
) -> dict:
    from bench import centralized, memory
    from bench.report import machine_info, write_bench_docs

    t0 = time.time()
    runs = out / "runs"
    stamp = lambda: f"{(time.time() - t0) / 60:.1f} min"  # noqa: E731
    methods = {}
    for m in (*METHODS, *VARIANT_METHODS):
        ov = merge_overrides(overrides, VARIANT_METHODS.get(m, [f"strategy={m}"]))
        run_dir = run_federated(m, overrides, runs, f"bench-{m}")
        methods[m] = method_entry(run_dir, owned_per_node(ov), out, analytic=m not in VARIANT_METHODS)
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
        "commit": code_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
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


def _same_runs(overrides: list[str]) -> list[str]:
    """The overrides that decide a method's figures (the engine does not: its results are bit-identical)."""
    return sorted(portable_arg(o) for o in overrides if not o.startswith("engine="))


def add_methods(
    names: list[str], overrides: list[str], out: Path, docs: Path, command: str, memory_args: tuple = ()
) -> dict:
    """Run only the federated methods `names` and put them into the existing <out>/results.json
    (a method added after the last full run, without the hours of the others): the results must
    have been made with these overrides; each added method records its commit, date and command.
    `memory` among the names measures every memory arm again, side by side (`memory_args`: the
    overrides, batch, seq and steps of bench.memory.measure)."""
    from bench import memory
    from bench.report import write_bench_docs

    path = out / "results.json"
    if not path.exists():
        raise SystemExit(f"--add: no {path}; run the whole benchmark first")
    results = json.loads(path.read_text())
    if _same_runs(results["overrides"]) != _same_runs(overrides):
        raise SystemExit(f"--add: {path} was made with {results['overrides']}, not {overrides}")
    unknown = sorted(set(names) - {*METHODS, *VARIANT_METHODS, "memory"})
    if unknown:
        raise SystemExit(f"--add: unknown method(s) {unknown}; choose from {[*METHODS, *VARIANT_METHODS, 'memory']}")
    if "memory" in names:
        results["memory"] = memory.measure(*memory_args)
        results.setdefault("added", {})["memory"] = _provenance(command)
    for m in (n for n in names if n != "memory"):
        ov = merge_overrides(overrides, VARIANT_METHODS.get(m, [f"strategy={m}"]))
        run_dir = run_federated(m, overrides, out / "runs", f"bench-{m}")
        results["methods"][m] = method_entry(run_dir, owned_per_node(ov), out, analytic=m not in VARIANT_METHODS)
        results.setdefault("added", {})[m] = _provenance(command)
        print(f"[bench] {m}: final held-out loss {results['methods'][m]['final_val_loss']:.4f}", flush=True)
    results["ratio_sources"] = {k: list(v) for k, v in RATIO_SOURCES.items()}
    results["ratios"] = compute_ratios(results)
    path.write_text(json.dumps(results, indent=2, sort_keys=True))
    write_bench_docs(results, docs, path)
    return results


def _provenance(command: str) -> dict:
    return {"command": command, "commit": code_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ablation",
        choices=["merge", "H", "nodes", "iid", "all"],
        help="run an ablation instead of the main benchmark (writes docs/results.md)",
    )
    p.add_argument("--out", default="benchmarks", help="results.json and runs/ go here")
    p.add_argument("--docs", default="docs", help="benchmarks.md / results.md and plots go here")
    p.add_argument(
        "--memory-overrides",
        default="model=small",
        help="Hydra overrides for the memory measurement (default: the paper's 4 x 4 ratio)",
    )
    p.add_argument("--memory-batch", type=int, default=4)
    p.add_argument("--memory-seq", type=int, default=128)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--bare-rounds", type=int, default=3, help="bare-loop rounds for the overhead (first is warm-up)")
    p.add_argument(
        "--overhead-h",
        type=int,
        nargs="*",
        default=[100],
        help="also measure the Flower overhead at these H (short SPES runs); none: skip",
    )
    p.add_argument(
        "--engine",
        choices=["inprocess", "flower"],
        default="inprocess",
        help="how the federated methods run (bit-identical results; the Flower overhead is always "
        "measured on Flower simulations)",
    )
    p.add_argument(
        "--overhead-rounds",
        type=int,
        default=3,
        help="rounds of each --overhead-h run (round 1 is start-up and is not timed)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the docs and plots from an existing <out>/results.json "
        "(and docs/results.md from <out>/ablations/*.json: a section per ablation, run or not)",
    )
    p.add_argument(
        "--add",
        metavar="METHOD[,METHOD...]",
        help="run only these federated methods (e.g. spes_topk2,spes_topk4; `memory`: the memory arms) and add "
        "them to the existing results.json",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every method")
    a = p.parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(portable_arg(x)) for x in argv)
    overrides = merge_overrides([*DEFAULTS, f"engine={a.engine}"], a.overrides)
    out, docs = Path(a.out).resolve(), Path(a.docs).resolve()
    if a.report_only:
        from bench.ablations import write_results_md
        from bench.report import write_bench_docs

        results_path = out / "results.json"
        if not results_path.exists():
            print(f"--report-only: no {results_path}; run the benchmark first", file=sys.stderr)
            return 2
        print(write_bench_docs(json.loads(results_path.read_text()), docs, results_path))
        print(write_results_md(out, docs))
        return 0
    if a.add:
        memory_args = (shlex.split(a.memory_overrides), a.memory_batch, a.memory_seq, a.memory_steps)
        add_methods(a.add.split(","), overrides, out, docs, command, memory_args)
        return 0
    if a.ablation:
        from bench.ablations import run_ablations

        run_ablations(a.ablation, overrides, out, docs)
        return 0
    mem_ov = shlex.split(a.memory_overrides)
    run_benchmark(
        overrides,
        out,
        docs,
        mem_ov,
        (a.memory_batch, a.memory_seq, a.memory_steps),
        a.bare_rounds,
        command,
        tuple(a.overhead_h),
        a.overhead_rounds,
    )
    return 0
