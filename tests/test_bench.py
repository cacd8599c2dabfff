"""The benchmark harness end to end on a very small model (in-process runs, one Flower simulation, the rest).

One bench run (~2 min on 2 CPUs) feeds every check: the
JSON fields exist, the ratios equal the ratios of the measured values they name, the bytes
agree with the analytic counts, and the docs and plots were written.

The report tests at the end are fast: they render the committed benchmarks/results.json
through the template, with the goals table or goals written here.
"""

import json
import math
import re
import shutil

import pytest
from micro import MICRO_MODEL

from bench.ablations import ABLATIONS, ablation_section, variants
from bench.harness import DEFAULTS, _same_runs, main
from bench.report import GOALS_FILE, RATIO_SOURCES, goal_context, load_goals, lookup, render, report_numbers, verdict
from bench.runs import VARIANT_METHODS, absolute_paths, merge_overrides

SMALL = [
    *MICRO_MODEL,
    "model.num_layers=4",  # the streaming row syncs 4 layer fragments
    "model.num_experts=8",
    "nodes=2",
    "rounds=2",
    "strategy.local_steps=2",
]
METHOD_FIELDS = (
    "final_val_loss",
    "bytes_up_per_round_node",
    "bytes_down_per_round_node",
    "peak_mem_mb_node",
    "tokens_per_s_node",
    "trainable_params_node",
    "wall_s",
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--out",
        str(out),
        "--docs",
        str(out / "docs"),
        "--memory-overrides",
        " ".join(SMALL),
        "--memory-batch",
        "2",
        "--memory-seq",
        "32",
        "--memory-steps",
        "2",
        "--bare-rounds",
        "2",
        "--overhead-h",
        "--overhead-rounds",
        "2",
        *SMALL,
    ]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_methods_have_the_required_fields(bench):
    _, res = bench
    assert set(res["methods"]) == {
        "spes",
        "diloco",
        "fedavg",
        "centralized",
        "spes_int8",
        "spes_bf16",
        *VARIANT_METHODS,
    }
    for name, entry in res["methods"].items():
        for key in METHOD_FIELDS:
            assert isinstance(entry[key], (int, float)) and math.isfinite(entry[key]), (name, key)
        assert entry["final_val_loss"] > 0 and entry["wall_s"] > 0 and entry["tokens_per_s_node"] > 0


def test_no_honest_update_is_dropped_by_the_guard(bench):
    _, res = bench
    federated = {m: e for m, e in res["methods"].items() if m != "centralized"}
    assert {m: e["guard_dropped_updates"] for m, e in federated.items()} == dict.fromkeys(federated, 0)


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
    out, res = bench
    assert set(res["ratios"]) == {
        "mem_spes_over_diloco",
        "bytes_spes_over_diloco",
        "loss_spes_over_centralized",
        "loss_spes_over_diloco",
        "flower_overhead",
        "bytes_spes_int8_over_diloco_fp32",
        "loss_spes_int8_over_spes_fp32",
        "bytes_spes_topk_over_diloco_fp32",
        "loss_spes_topk_over_spes_fp32",
        *(f"{w}_resident_{a}_over_spes" for w in ("mem", "bytes", "loss") for a in ("owned", "owned2")),
        "peak_bytes_streaming_over_spes",
    }
    m, mem, over = res["methods"], res["memory"], res["overhead"]
    expected = {
        "mem_spes_over_diloco": mem["spes"]["peak_rss_mb"] / mem["diloco"]["peak_rss_mb"],
        "bytes_spes_over_diloco": steady(m["spes"]) / steady(m["diloco"]),
        "loss_spes_over_centralized": m["spes"]["final_val_loss"] / m["centralized"]["final_val_loss"],
        "loss_spes_over_diloco": m["spes"]["final_val_loss"] / m["diloco"]["final_val_loss"],
        "flower_overhead": over["sim_round_s"] / over["bare_round_s"],
        "bytes_spes_int8_over_diloco_fp32": steady(m["spes_int8"]) / steady(m["diloco"]),
        "loss_spes_int8_over_spes_fp32": m["spes_int8"]["final_val_loss"] / m["spes"]["final_val_loss"],
        "bytes_spes_topk_over_diloco_fp32": steady(m["spes_topk2"]) / steady(m["diloco"]),
        "loss_spes_topk_over_spes_fp32": m["spes_topk2"]["final_val_loss"] / m["spes"]["final_val_loss"],
        "mem_resident_owned_over_spes": mem["spes_owned"]["peak_rss_mb"] / mem["spes"]["peak_rss_mb"],
        "bytes_resident_owned2_over_spes": steady(m["spes_owned2"]) / steady(m["spes"]),
        "loss_resident_owned_over_spes": m["spes_owned"]["final_val_loss"] / m["spes"]["final_val_loss"],
        "peak_bytes_streaming_over_spes": m["spes_fragments4"]["bytes_peak_round_node"]
        / m["spes"]["bytes_peak_round_node"],
    }
    assert steady(m["spes_owned"]) < steady(m["spes_owned2"]) < steady(m["spes"])  # fewer experts come down
    # Round 2 syncs one of 4 layer fragments (layer 1: no embeddings, no head) where SPES sends
    # the whole model down after round 1's merge.
    assert 0 < m["spes_fragments4"]["bytes_peak_round_node"] < 0.5 * m["spes"]["bytes_peak_round_node"]
    for key, value in expected.items():
        assert res["ratios"][key] == pytest.approx(value, rel=1e-12), key
        num, den = res["ratio_sources"][key]
        assert res["ratios"][key] == pytest.approx(lookup(res, num) / lookup(res, den), rel=1e-12), key
    # The overhead's numerator is the per-round wall time (metrics.jsonl) of its own short run, a real
    # Flower simulation (its SuperLink and `flwr run` logs are there), while the methods ran in-process.
    # run_dir is recorded relative to the folder of results.json.
    runs = out / res["runs_dir"]
    metrics = [json.loads(x) for x in (runs / "bench-overhead" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in metrics] == [2, 4]
    assert over["sim_round_s"] == pytest.approx(metrics[1]["wall_s"] - metrics[0]["wall_s"])
    assert over["bare_round_s"] > 0 and res["ratios"]["flower_overhead"] > 1
    assert (runs / "bench-overhead" / "flower" / "flwr-run.log").stat().st_size > 0
    assert not (out / m["spes"]["run_dir"] / "flower").exists() and over["at_local_steps"] == {}


def test_add_reruns_one_method_into_the_results_it_belongs_to(bench, tmp_path):
    out, res = bench
    shutil.copytree(out, tmp_path / "b")
    path = tmp_path / "b" / "results.json"
    partial = {**res, "methods": {k: v for k, v in res["methods"].items() if k != "spes_topk4"}}
    partial.pop("ratios")
    path.write_text(json.dumps(partial))
    args = ["--out", str(tmp_path / "b"), "--docs", str(tmp_path / "docs")]
    memory = ["--memory-overrides", " ".join(SMALL), "--memory-batch", "2", "--memory-seq", "32", "--memory-steps", "2"]
    assert main([*args, "--add", "spes_topk4,memory", *memory, *SMALL]) == 0
    added = json.loads(path.read_text())
    # The same run again (in-process runs are deterministic), its provenance, the ratios
    # recomputed; the memory arms measured again, side by side.
    assert added["methods"]["spes_topk4"]["final_val_loss"] == res["methods"]["spes_topk4"]["final_val_loss"]
    assert set(added["added"]) == {"spes_topk4", "memory"}
    assert "--add spes_topk4,memory" in added["added"]["spes_topk4"]["command"]
    assert {k: v for k, v in added["ratios"].items() if not k.startswith("mem_")} == {
        k: v for k, v in res["ratios"].items() if not k.startswith("mem_")
    }
    assert added["memory"]["spes_owned"]["held_params"] == res["memory"]["spes_owned"]["held_params"]
    assert added["ratios"]["mem_resident_owned_over_spes"] == pytest.approx(
        added["memory"]["spes_owned"]["peak_rss_mb"] / added["memory"]["spes"]["peak_rss_mb"]
    )
    with pytest.raises(SystemExit, match="was made with"):
        main([*args, "--add", "spes_topk4", *SMALL, "rounds=3"])
    # The engine does not decide a method's figures (bit-identical results), so results made on
    # Flower simulations take a method run in-process.
    assert _same_runs(["rounds=2", "engine=flower"]) == _same_runs(["engine=inprocess", "rounds=2"]) == ["rounds=2"]
    with pytest.raises(SystemExit, match="unknown method"):
        main([*args, "--add", "sparse", *SMALL])


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
    # Compressed SPES: int8 (1 byte + a float32 scale per row) and bf16 (2 bytes) under a quarter /
    # about half of fp32 SPES; on the wire every array adds its header.
    int8, bf16 = res["methods"]["spes_int8"], res["methods"]["spes_bf16"]
    assert "analytic" not in int8 and int8["steady_rounds"] == [2]
    assert steady(int8) < 0.3 * steady(spes) and steady(bf16) < 0.55 * steady(spes)
    for entry in (spes, diloco, int8, bf16):
        assert entry["wire_bytes_steady_per_round_node"] > entry["bytes_steady_per_round_node"]
    # Top-k: about 1/64 of the entries at 2 or 4 bits plus positions and scales; DiLoCo's the same way.
    topk2, topk4, dtopk2 = (res["methods"][m] for m in ("spes_topk2", "spes_topk4", "diloco_topk2"))
    assert steady(topk2) < steady(topk4) < 0.1 * steady(spes)
    assert steady(topk2) < steady(dtopk2) < 0.1 * steady(diloco)


def test_memory_measured_in_fresh_processes_with_floor(bench):
    _, res = bench
    mem = res["memory"]
    for n in ("spes", "diloco", "spes_owned", "spes_owned2"):
        r = mem[n]
        assert r["peak_rss_mb"] >= r["rss_after_imports_mb"] > 0
        assert r["analytic_floor_mb"] == pytest.approx(4 * (r["held_params"] + 3 * r["trainable_params"]) / 2**20)
    assert mem["spes"]["trainable_params"] < mem["diloco"]["trainable_params"] == mem["diloco"]["total_params"]
    # Partial residency: node 0 holds its 4 of 8 experts (and 2 more per layer); one expert is
    # 3 x 64 x 32 weights (SwiGLU), in each of 4 layers; it trains what a SPES node trains.
    expert, total = 3 * 64 * 32, mem["spes"]["total_params"]
    assert mem["spes"]["held_params"] == total
    assert mem["spes_owned"]["held_params"] == total - 4 * 4 * expert
    assert mem["spes_owned2"]["held_params"] == total - 2 * 4 * expert
    assert (
        mem["spes_owned"]["trainable_params"]
        == mem["spes_owned2"]["trainable_params"]
        == mem["spes"]["trainable_params"]
    )


def test_results_hold_only_relative_paths(bench):
    out, res = bench
    assert absolute_paths({k: v for k, v in res.items() if k != "command"}) == []  # command names the tmp --out
    assert res["runs_dir"] == "runs"
    for name, entry in res["methods"].items():
        assert entry["run_dir"] == f"runs/bench-{name}"
        assert (out / entry["run_dir"] / "summary.json").is_file()


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
        ("spes", ["strategy.merge.enabled=true"]),
        ("spes", ["strategy.merge.enabled=false"]),
    ]
    assert {(s, ov[0]) for _, s, ov in variants("iid", base)} == {
        (s, f"data.partition={p}") for s in ("spes", "diloco") for p in ("iid", "contiguous")
    }


def test_merge_overrides_later_wins():
    merged = merge_overrides(["model=tiny", "rounds=16"], ["rounds=2", "nodes=2"])
    assert merged == ["model=tiny", "rounds=2", "nodes=2"]


# --- the report: template + goals table, from the committed results (no benchmark run) ---

ROOT = GOALS_FILE.parent.parent.parent
COMMITTED = ROOT / "benchmarks" / "results.json"


def committed():
    return json.loads(COMMITTED.read_text())


@pytest.fixture(scope="module")
def numbers():
    """The goal-independent part of the report context (composes a few configs: build it once)."""
    return report_numbers(committed(), COMMITTED)


def report(numbers, goals) -> str:
    return render("benchmarks.md.j2", {**numbers, **goal_context(numbers["r"], goals)})


def ratio_table(text: str) -> dict:
    """ratio -> (value, numerator path, denominator path, goal cell) from the Ratios table."""
    rows = re.findall(r"^\| `(\w+)` \| ([\d.]+) \| `([\w.]+)` / `([\w.]+)` \| [^|]+ \| ([^|]+) \|$", text, re.M)
    return {k: (v, num, den, goal.strip()) for k, v, num, den, goal in rows}


def write_goals(tmp_path, text: str):
    path = tmp_path / "goals.yaml"
    path.write_text(text)
    return path


def test_report_ratios_equal_the_ratios_of_the_values_they_name(numbers):
    res = committed()
    table = ratio_table(report(numbers, load_goals()))
    assert set(table) == set(res["ratios"]) <= set(RATIO_SOURCES)  # results from before a method lack its ratios
    for key, (value, num, den, _) in table.items():
        assert (num, den) == RATIO_SOURCES[key]
        assert value == f"{lookup(res, num) / lookup(res, den):.4f}", key


def test_report_goals_and_verdicts_follow_the_goals_table(tmp_path, numbers):
    res = committed()
    loss, mem = res["ratios"]["loss_spes_over_centralized"], res["ratios"]["mem_spes_over_diloco"]
    above, below = round(loss + 0.05, 2), round(loss - 0.05, 2)
    mem_goal, mem_acc = round(mem - 0.02, 2), round(mem + 0.03, 2)
    goals = load_goals(
        write_goals(
            tmp_path,
            f"""
loss_spes_over_centralized: {{goal: {above}}}
mem_spes_over_diloco: {{goal: {mem_goal}, acceptance: {mem_acc}}}
""",
        )
    )
    text = report(numbers, goals)
    table = ratio_table(text)
    assert table["loss_spes_over_centralized"][3] == f"<= {above:.2f}"
    assert table["mem_spes_over_diloco"][3] == f"<= {mem_goal:.2f} (acceptance <= {mem_acc:.2f})"
    assert table["flower_overhead"][3] == "-"  # no goal in the table: no goal, no verdict
    assert f"`loss_spes_over_centralized` {loss:.3f} meets the goal (<= {above:.2f})." in text
    assert (
        f"Measured {mem:.3f}: meets the acceptance bound (<= {mem_acc:.2f}) but misses the "
        f"{mem_goal:.2f} goal by {mem - mem_goal:.3f}."
    ) in text
    assert "\nWhy: " in text
    assert "`flower_overhead` " not in text.split("## Flower overhead")[1].split("## Analytic")[0].replace(
        "`flower_overhead` = ", ""
    )

    goals = load_goals(write_goals(tmp_path, f"loss_spes_over_centralized: {{goal: {below}}}\n"))
    text = report(numbers, goals)
    assert f"`loss_spes_over_centralized` {loss:.3f} misses the goal (<= {below:.2f}) by {loss - below:.3f}." in text
    assert "Target: SPES / DiLoCo" not in text


def test_default_goals_table_loads():
    goals = load_goals()
    assert goals and set(goals) <= set(RATIO_SOURCES)
    for g in goals.values():
        assert g["acceptance"] is None or g["acceptance"] >= g["goal"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("loss_spes_over_nothing: {goal: 1.0}\n", "unknown ratio 'loss_spes_over_nothing'"),
        ("flower_overhead: {goal: high}\n", "flower_overhead.goal must be a number"),
        ("flower_overhead: {goal: 1.1, acceptance: 1.0}\n", "stricter than its goal"),
        ("flower_overhead: {bound: 1.1}\n", "needs `goal`"),
        ("- 1.1\n", "expected a mapping"),
    ],
)
def test_bad_goals_table_is_rejected_naming_file_and_key(tmp_path, text, message):
    path = write_goals(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(message)) as exc:
        load_goals(path)
    assert str(path) in str(exc.value)


def test_missing_goals_table_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="goals.yaml"):
        load_goals(tmp_path / "goals.yaml")


def test_verdict_against_goal_and_acceptance():
    v = verdict(0.62, {"goal": 0.60, "acceptance": 0.65})
    assert (v["meets_goal"], v["meets_acceptance"]) == (False, True)
    assert v["goal_gap"] == pytest.approx(0.02) and v["acceptance_gap"] == pytest.approx(-0.03)
    v = verdict(1.0, {"goal": 1.03, "acceptance": None})
    assert v["meets_goal"] and v["meets_acceptance"] is None and v["acceptance_gap"] is None
    assert verdict(1.03, {"goal": 1.03, "acceptance": None})["meets_goal"]  # the bound itself meets it


def test_ablation_section_best_and_gaps():
    def run(loss):
        return {
            "final_val_loss": loss,
            "val_loss_by_round": [9.0, 8.0, loss],
            "bytes_up_per_round_node": 3,
            "bytes_down_per_round_node": 5,
            "tokens_by_round": [0, 1, 2],
            "overrides": [],
            "wall_s": 1.0,
        }

    res = {"order": ["a", "b", "c"], "variants": {"a": run(2.0), "b": run(1.5), "c": run(1.75)}}
    s = ablation_section("merge", res)
    assert s["best"]["label"] == "b"
    assert [(k, pytest.approx(g)) for k, g in s["others"]] == [("a", 0.5), ("c", 0.25)]
    assert [(r["label"], r["rounds"], r["bytes_all_rounds"]) for r in s["rows"]] == [
        ("a", 2, 8),
        ("b", 2, 8),
        ("c", 2, 8),
    ]
    assert ablation_section("merge", None)["run"] is None


def test_report_only_rewrites_both_pages_from_the_json(tmp_path):
    out, docs = tmp_path / "bench", tmp_path / "docs"
    (out / "ablations").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "ablation_merge.json", out / "ablations" / "merge.json")  # one is enough
    shutil.copy(COMMITTED, out / "results.json")
    assert main(["--report-only", "--out", str(out), "--docs", str(docs)]) == 0
    bench_md, results_md = (docs / "benchmarks.md").read_text(), (docs / "results.md").read_text()
    res = committed()
    for key, value in res["ratios"].items():
        assert f"| `{key}` | {value:.4f} |" in bench_md
    abl = json.loads((out / "ablations" / "merge.json").read_text())
    for label, e in abl["variants"].items():
        assert f"| {label} | `{' '.join(e['overrides'])}` | {e['final_val_loss']:.4f} |" in results_md
    assert (docs / "ablation_merge.png").stat().st_size > 10_000
    assert results_md.count("Not run yet.") == len(ABLATIONS) - 1
    assert main(["--report-only", "--out", str(tmp_path / "none"), "--docs", str(docs)]) == 2


def test_partial_residency_at_7b_by_hand():
    """7b, 4 nodes: 890,775,552 shared parameters, 32 experts of 201,326,592 (all layers), 8 owned."""
    from bench.report import _preset_residency

    rows = {name: (held, ratios) for name, held, ratios in _preset_residency()}
    held, (mem_owned, mem_owned2, bytes_owned, bytes_owned2) = rows["7b"]
    shared, per, total = 890_775_552, 201_326_592, 7_333_226_496
    trained = shared + 8 * per
    assert held == pytest.approx([4 * total / 1e9, 4 * trained / 1e9, 4 * (trained + 2 * per) / 1e9])
    # Steady bytes: up shared + 8 experts; down every other expert (SPES), nothing but the shared
    # weights (owned), and 2 more experts (owned+2).
    assert bytes_owned == pytest.approx((trained + shared) / (trained + total - 8 * per))
    assert bytes_owned2 == pytest.approx((trained + shared + 2 * per) / (trained + total - 8 * per))
    assert mem_owned == pytest.approx(4 * trained / (total + 3 * trained))  # weights + grads + 2 moments
    assert mem_owned2 == pytest.approx((trained + 2 * per + 3 * trained) / (total + 3 * trained))
    assert bytes_owned == pytest.approx(0.41247, abs=1e-5) and mem_owned == pytest.approx(0.67435, abs=1e-5)
