"""The benchmark harness end to end on a very small model (3 Flower simulations + the rest).

One bench run (~2-4 min on 2 CPUs, most of it Flower/Ray start-up) feeds every check: the
JSON fields exist, the ratios equal the ratios of the measured values they name, the bytes
agree with the analytic counts, and the docs and plots were written.
"""

import json
import math

import pytest

from micro import MICRO_MODEL
from sim.ablations import variants
from sim.bench import DEFAULTS, RATIO_SOURCES, lookup, main, merge_overrides

SMALL = [
    *MICRO_MODEL,
    "model.num_experts=8",
    "nodes=2",
    "rounds=2",
    "strategy.local_steps=2",
]
METHOD_FIELDS = (
    "final_val_loss", "bytes_up_per_round_node", "bytes_down_per_round_node", "peak_mem_mb_node",
    "tokens_per_s_node", "trainable_params_node", "wall_s",
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--out", str(out), "--docs", str(out / "docs"), "--memory-overrides", " ".join(SMALL),
        "--memory-batch", "2", "--memory-seq", "32", "--memory-steps", "2", "--bare-rounds", "2", "--overhead-h", "3", "--overhead-rounds", "2", *SMALL,
    ]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_methods_have_the_required_fields(bench):
    _, res = bench
    assert set(res["methods"]) == {"spes", "diloco", "fedavg", "centralized"}
    for name, entry in res["methods"].items():
        for key in METHOD_FIELDS:
            assert isinstance(entry[key], (int, float)) and math.isfinite(entry[key]), (name, key)
        assert entry["final_val_loss"] > 0 and entry["wall_s"] > 0 and entry["tokens_per_s_node"] > 0


def test_same_token_budget_and_model_for_every_method(bench):
    _, res = bench
    tokens = {m: e["tokens_trained"] for m, e in res["methods"].items()}
    assert set(tokens.values()) == {2 * 2 * 2 * 4 * 64}, tokens  # nodes x rounds x H x batch x seq
    assert len({e["total_params"] for e in res["methods"].values()}) == 1
    firsts = {round(e["first_val_loss"], 5) for e in res["methods"].values()}
    assert len(firsts) == 1, firsts  # same initial model and held-out data everywhere


def steady(entry):
    return entry["bytes_up_steady_per_round_node"] + entry["bytes_down_steady_per_round_node"]


def test_ratios_are_the_ratios_of_the_measured_values(bench):
    _, res = bench
    assert set(res["ratios"]) == {
        "mem_spes_over_diloco", "bytes_spes_over_diloco", "loss_spes_over_centralized",
        "loss_spes_over_diloco", "flower_overhead",
    }
    m, mem, over = res["methods"], res["memory"], res["overhead"]
    expected = {
        "mem_spes_over_diloco": mem["spes"]["peak_rss_mb"] / mem["diloco"]["peak_rss_mb"],
        "bytes_spes_over_diloco": steady(m["spes"]) / steady(m["diloco"]),
        "loss_spes_over_centralized": m["spes"]["final_val_loss"] / m["centralized"]["final_val_loss"],
        "loss_spes_over_diloco": m["spes"]["final_val_loss"] / m["diloco"]["final_val_loss"],
        "flower_overhead": over["sim_round_s"] / over["bare_round_s"],
    }
    for key, value in expected.items():
        assert res["ratios"][key] == pytest.approx(value, rel=1e-12), key
        num, den = res["ratio_sources"][key]
        assert res["ratios"][key] == pytest.approx(lookup(res, num) / lookup(res, den), rel=1e-12), key
    # The overhead's numerator is the simulation's own per-round wall time from metrics.jsonl.
    metrics = [json.loads(x) for x in open(f"{m['spes']['run_dir']}/metrics.jsonl")]
    assert over["sim_round_s"] == pytest.approx((metrics[-1]["wall_s"] - metrics[0]["wall_s"]) / (len(metrics) - 1))
    assert over["bare_round_s"] > 0 and res["ratios"]["flower_overhead"] > 1
    # The extra measurement at another H comes from its own simulation run, timed the same way.
    at = over["at_local_steps"]["3"]
    h3 = [json.loads(x) for x in open(f"{res['out']}/runs/bench-overhead-H3/metrics.jsonl")]
    assert [r["global_step"] for r in h3] == [3, 6]
    assert at["sim_round_s"] == pytest.approx(h3[1]["wall_s"] - h3[0]["wall_s"])
    assert at["flower_overhead"] == pytest.approx(at["sim_round_s"] / at["bare_round_s"])


def test_bytes_match_the_analytic_counts(bench):
    _, res = bench
    spes, diloco = res["methods"]["spes"], res["methods"]["diloco"]
    e = spes["total_params"]
    for entry in (spes, diloco, res["methods"]["fedavg"]):
        a = entry["analytic"]
        assert entry["bytes_up_steady_per_round_node"] == a["bytes_up_per_round_node"]
        assert entry["bytes_down_steady_per_round_node"] == a["bytes_down_steady_per_round_node"]
        assert entry["bytes_down_per_round_node"] == pytest.approx(a["bytes_down_per_round_node_all_rounds"])
    assert diloco["analytic"]["bytes_steady_per_round_node"] == 2 * 4 * e
    # SPES: 4 of 8 experts per node; no merge step within 4 global steps -> round 2 is steady state.
    assert spes["steady_rounds"] == [2] and spes["analytic"]["owned_experts"] == 4
    assert spes["bytes_steady_per_round_node"] < diloco["bytes_steady_per_round_node"]
    assert res["analytic_ratios"]["bytes_spes_over_diloco"] == pytest.approx(res["ratios"]["bytes_spes_over_diloco"])


def test_memory_measured_in_fresh_processes_with_floor(bench):
    _, res = bench
    mem = res["memory"]
    for n in ("spes", "diloco"):
        r = mem[n]
        assert r["peak_rss_mb"] >= r["rss_after_imports_mb"] > 0
        assert r["analytic_floor_mb"] == pytest.approx(4 * (r["total_params"] + 3 * r["trainable_params"]) / 2**20)
    assert mem["spes"]["trainable_params"] < mem["diloco"]["trainable_params"] == mem["diloco"]["total_params"]


def test_docs_and_plots_written(bench):
    out, res = bench
    docs = out / "docs"
    text = (docs / "benchmarks.md").read_text()
    assert res["command"] in text and res["date"] in text
    for key in res["ratios"]:
        assert f"`{key}`" in text
    for png in ("bench_loss.png", "bench_bytes.png", "bench_memory.png"):
        assert (docs / png).stat().st_size > 10_000, png


def test_ablation_variants_keep_the_budget():
    base = merge_overrides(DEFAULTS, [])
    h = variants("H", base)
    assert [v[0] for v in h] == ["H=25", "H=100", "H=400"]
    steps = {int(ov[0].split("=")[1]) * int(ov[1].split("=")[1]) for _, _, ov in h}
    assert steps == {16 * 25}  # rounds x H constant
    nodes = variants("nodes", base)
    assert {int(ov[0].split("=")[1]) * int(ov[1].split("=")[1]) for _, _, ov in nodes} == {4 * 8}  # global batch
    assert [v[1:] for v in variants("merge", base)] == [
        ("spes", ["strategy.merge.enabled=true"]), ("spes", ["strategy.merge.enabled=false"])]
    assert {(s, ov[0]) for _, s, ov in variants("iid", base)} == {
        (s, f"data.partition={p}") for s in ("spes", "diloco") for p in ("iid", "contiguous")}


def test_merge_overrides_later_wins():
    merged = merge_overrides(["model=tiny", "rounds=16"], ["rounds=2", "nodes=2"])
    assert merged == ["model=tiny", "rounds=2", "nodes=2"]
