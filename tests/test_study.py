"""Studies: the pure pieces against hand-computed values, and a micro study end to end (in-process)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro import MICRO_MODEL

from bench import study as study_mod
from bench.study import cell_id, cell_overrides, load_study, run_study
from bench.study_cost import flops_per_token, training_flops
from bench.study_report import (
    README_BEGIN,
    README_END,
    fit_log_trend,
    interpolate,
    late_imbalance,
    mean_std,
    paired_ratios,
    planned_runs,
    progress_line,
    readme_lines,
    replace_readme_block,
    write_page,
)
from bench.wan import rounds_to
from server_app.config import load

ROOT = Path(__file__).resolve().parent.parent


def test_mean_and_sample_std():
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert mean_std([5.0]) == (5.0, 0.0)


def test_late_imbalance_averages_each_runs_last_rounds_then_over_seeds():
    runs = [{"expert_imbalance_by_round": [9.0, 2.0, 4.0]}, {"expert_imbalance_by_round": [9.0, None, 6.0]}]
    # last 2 rounds: run 1 -> (2 + 4) / 2 = 3; run 2 -> 6 (None skipped); mean 4.5, sample std sqrt(4.5)
    assert late_imbalance(runs, rounds=2) == f"4.500 ± {math.sqrt(4.5):.3f}"
    assert late_imbalance([*runs, {"expert_imbalance_by_round": []}], rounds=2) == "-"  # a centralized run
    assert late_imbalance(runs[:1], rounds=1) == "4.000 (1 seed)"


def test_interpolate_inside_and_outside():
    assert interpolate([0, 10, 20], [4.0, 3.0, 1.0], 15) == pytest.approx(2.0)
    assert interpolate([0, 10], [4.0, 3.0], 10) == 3.0
    assert interpolate([0, 10], [4.0, 3.0], 11) is None


def test_paired_ratios_match_seeds_and_read_flops_curves():
    ref = [
        {"seed": 0, "final_val_loss": 4.0, "flops_by_round": [0, 100, 200], "val_loss_by_round": [6.0, 5.0, 4.0]},
        {"seed": 1, "final_val_loss": 5.0, "flops_by_round": [0, 100, 200], "val_loss_by_round": [6.0, 5.5, 5.0]},
    ]
    arm = [
        {"seed": 1, "final_val_loss": 5.5, "flops_by_round": [0, 50]},
        {"seed": 0, "final_val_loss": 4.4, "flops_by_round": [0, 150]},
        {"seed": 7, "final_val_loss": 1.0, "flops_by_round": [0, 1]},
    ]  # no reference run: left out
    assert paired_ratios(arm, ref) == pytest.approx([5.5 / 5.0, 4.4 / 4.0])
    # at equal FLOPs: seed 1's reference at 50 FLOPs is 5.75, seed 0's at 150 is 4.5
    assert paired_ratios(arm, ref, equal_flops=True) == pytest.approx([5.5 / 5.75, 4.4 / 4.5])


def test_log_trend_recovers_a_line_and_its_sign():
    points = [(1e5, [1.20, 1.20]), (1e6, [1.10, 1.10]), (1e7, [1.00, 1.00])]
    a, b, se = fit_log_trend(points)
    assert b == pytest.approx(-0.10) and a == pytest.approx(1.70) and se == pytest.approx(0.0, abs=1e-12)
    assert fit_log_trend([(1e5, [1.0])]) is None


def test_readme_line_of_a_study_with_per_arm_references_gives_ratios_and_the_trend():
    def cells(arm, losses):
        return {f"{arm}{s}": {"arm": arm, "point": None, "seed": s, "final_val_loss": v} for s, v in enumerate(losses)}

    arms = {
        "a-small": {"reference": "c-small", "series": "a", "x": 1e5},
        "a-big": {"reference": "c-big", "series": "a", "x": 1e6},
        "c-small": {},
        "c-big": {},
    }
    results = {
        "title": "T",
        "base": ["nodes=4"],
        "arms": arms,
        "seeds": [0, 1],
        "cells": {
            **cells("a-small", [4.4, 5.5]),
            **cells("c-small", [4.0, 5.0]),
            **cells("a-big", [3.6, 2.4]),
            **cells("c-big", [3.0, 2.0]),
        },
    }
    (line,) = readme_lines(results)
    assert "a-small / c-small 1.1000 ± 0.0000" in line and "a-big / c-big 1.2000 ± 0.0000" in line
    assert "per 10x tokens a +0.1000 ± 0.0000" in line  # 1.1 at 1e5, 1.2 at 1e6
    assert "c-big /" not in line


def test_rounds_to_target_interpolates_between_rounds():
    assert rounds_to([7.0, 6.0, 5.0, 4.0], 4.5) == pytest.approx(2.5)
    assert rounds_to([7.0, 6.0], 5.0) is None


def test_flops_per_token_by_hand():
    spec = load([*MICRO_MODEL, "model.num_experts=8", "nodes=2", "model.num_heads=4", "model.num_kv_heads=2"])
    d, L, E, ffn, vocab, seq = 64, 2, 8, 32, 512, 64
    hd = d // 4
    attn = d * 4 * hd * 2 + d * 2 * hd * 2
    shared = L * (attn + d * E) + d * vocab
    expert = L * 3 * d * ffn
    active = shared + 2 * expert
    attn_seq = L * 2 * 2 * seq * 4 * hd
    spes = 4 * active + 2 * (shared + 2 * (4 / 8) * expert) + 3 * attn_seq  # a node owns 4 of 8 experts
    full = 6 * active + 3 * attn_seq
    assert flops_per_token(spec, vocab) == pytest.approx(spes)
    assert training_flops(spec, 10, centralized=True) == pytest.approx(10 * full)
    assert training_flops(load([*MICRO_MODEL, "model.num_experts=8", "strategy=diloco"]), 1) == pytest.approx(full)


def test_study_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: t\nquestion: q\nbase: []\nseeds: [0]\narms: {a: {overides: []}}\n")
    with pytest.raises(SystemExit, match="overides"):
        load_study(str(bad))
    bad.write_text("title: t\nquestion: q\nbase: []\nseeds: [0]\nreference: nope\narms: {a: {overrides: []}}\n")
    with pytest.raises(SystemExit, match="reference or subject 'nope' is not an arm"):
        load_study(str(bad))


def test_shipped_studies_load_and_every_cell_config_is_valid():
    for path in sorted((ROOT / "conf" / "study").glob("*.yaml")):
        study_mod.check_study(load_study(path.stem))


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    base = [
        *MICRO_MODEL,
        "model.num_experts=4",
        "nodes=2",
        "rounds=2",
        "strategy.local_steps=2",
        "strategy.merge.enabled=false",
        "eval.max_batches=2",
    ]
    (tmp / "micro.yaml").write_text(
        json.dumps(
            {
                "title": "micro",
                "question": "does the runner work?",
                "base": base,
                "seeds": [0, 1],
                "reference": "central",
                "subject": "spes",
                "arms": {
                    "spes": {"overrides": [], "grid": {"lo": ["train.lr=1e-3"], "hi": ["train.lr=6e-3"]}},
                    "central": {"kind": "centralized", "overrides": []},
                },
            }
        )
    )  # JSON is YAML
    study = load_study(str(tmp / "micro.yaml"))
    results = run_study(study, tmp / "out", threads=1)
    return study, results, tmp


def test_micro_study_runs_the_grid_on_one_seed_and_the_best_point_on_every_seed(micro_study):
    study, results, _ = micro_study
    cells = results["cells"]
    spes = [c for c in cells.values() if c["arm"] == "spes"]
    tuned = {c["point"]: c["final_val_loss"] for c in spes if c["seed"] == 0}
    best = min(tuned, key=tuned.get)
    assert set(tuned) == {"lo", "hi"} and sorted(c["seed"] for c in spes if c["point"] == best) == [0, 1]
    assert len(cells) == 3 + 2  # 2 grid points + 1 more seed of the best, 2 centralized seeds
    for key, c in cells.items():
        arm = study.arms[0] if c["arm"] == "spes" else study.arms[1]
        assert key == cell_id(cell_overrides(study, arm, c["point"], c["seed"]), arm.name)
        assert f"seed={c['seed']}" in c["overrides"] and len(c["val_loss_by_round"]) == 3
        assert c["tokens_by_round"][-1] == 2 * 2 * 2 * 4 * 64 and c["flops_by_round"][-1] > 0
    # the seeds differ: another init and data order
    assert len({c["final_val_loss"] for c in cells.values() if c["arm"] == "central"}) == 2


def test_micro_study_resumes_without_rerunning_a_cell(micro_study, monkeypatch):
    study, results, tmp = micro_study

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(study_mod, "run_cell", must_not_run)
    again = run_study(study, tmp / "out", threads=1)
    assert again["cells"] == results["cells"]


def _run_of(micro_study, cell) -> Path:
    from bench.study import cell_run_folder

    study, _, tmp = micro_study
    return cell_run_folder(tmp / "out", study.name, cell)


def _heldout_loss(model, cell, run: Path) -> float:
    """`model`'s held-out loss on the split and settings `cell` was evaluated with."""
    from data import load_tokenizer, prepare_blocks
    from training.trainer import evaluate

    spec = load(cell["overrides"])
    _, heldout = prepare_blocks(spec.data, load_tokenizer(spec.data, run.parent / ".cache"), run.parent / ".cache")
    return evaluate(model, heldout, spec.eval.batch_size, spec.eval.max_batches, "cpu")[0]


def test_the_centralized_run_leaves_its_final_model_which_scores_its_final_loss(micro_study):
    from transformers import AutoModelForCausalLM

    cell = next(c for c in micro_study[1]["cells"].values() if c["arm"] == "central")
    run = _run_of(micro_study, cell)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert _heldout_loss(model, cell, run) == pytest.approx(cell["final_val_loss"], abs=1e-5)


def test_gap_movement_by_group_and_expert_by_hand():
    from bench.gap import movement_by_expert, movement_by_group

    start = {
        "model.embed_tokens.weight": torch.ones(2, 2),  # ||w0|| = 2
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.tensor([[3.0, 0.0]]),
        "model.layers.1.mlp.experts.0.up_proj.weight": torch.tensor([[0.0, 4.0]]),  # expert 0: ||w0|| = 5
        "model.layers.0.mlp.experts.1.up_proj.weight": torch.tensor([[1.0, 0.0]]),
    }
    final = dict(start)
    final["model.embed_tokens.weight"] = torch.full((2, 2), 1.5)  # moved 1 of 2
    final["model.layers.1.mlp.experts.0.up_proj.weight"] = torch.tensor([[0.0, 4.0 + 5.0]])  # moved 5 of 5
    assert movement_by_group(final, start) == pytest.approx({"embedding": 0.5, "experts": math.sqrt(25 / 26)})
    assert movement_by_expert(final, start) == pytest.approx({0: 1.0, 1: 0.0})


def test_gap_rebuilds_the_shared_start_and_compares_the_runs(micro_study):
    from bench.gap import compare, initial_model

    # Seed 1: the seed both arms ran with their chosen settings.
    cells = {c["arm"]: c for c in micro_study[1]["cells"].values() if c["seed"] == 1}
    fed, central = _run_of(micro_study, cells["spes"]), _run_of(micro_study, cells["central"])
    loss = _heldout_loss(initial_model(fed), cells["spes"], fed)
    assert loss == pytest.approx(cells["spes"]["val_loss_by_round"][0], abs=1e-5)  # the federated run's start
    assert loss == pytest.approx(cells["central"]["val_loss_by_round"][0], abs=1e-5)  # and the centralized run's
    result = compare(fed, central)
    assert set(result["groups"]) == {"embedding", "attention", "norms", "router", "experts", "lm_head"}
    assert all(r["federated"] > 0 and r["centralized"] > 0 for r in result["groups"].values())
    assert set(result["by_owner"]) == {"0", "1"} and len(result["experts"]) == 4


def test_gap_over_seeds_lists_groups_and_the_extreme_owners_in_seed_order():
    from bench.gap import over_seeds

    def result(router, owners):
        return {
            "groups": {"router": {"federated": router, "centralized": 1.0, "ratio": router}},
            "by_owner": {n: {"federated": r, "centralized": 1.0, "ratio": r} for n, r in owners.items()},
        }

    summary = over_seeds({1: result(0.5, {"0": 0.9, "1": 0.7}), 0: result(0.25, {"0": 0.6, "1": 0.8})})
    assert summary["seeds"] == [0, 1]
    rows = {r["label"]: r for r in summary["rows"]}
    assert [r["label"] for r in summary["rows"]] == [
        "router",
        "experts, least-moved owner",
        "experts, most-moved owner",
    ]
    assert rows["router"]["ratio"] == [0.25, 0.5]
    assert rows["experts, least-moved owner"]["ratio"] == [0.6, 0.7]
    assert rows["experts, most-moved owner"]["ratio"] == [0.8, 0.9]


def test_gap_over_a_studys_seeds_pairs_the_best_point_with_the_same_seeds_reference(micro_study):
    from bench.gap import compare, main

    study, results, tmp = micro_study
    out = tmp / "out"
    assert main(["--study", "micro", "--arm", "spes", "--out", str(out)]) == 0
    summary = json.loads((out / "gap" / "micro-spes.json").read_text())
    rows = {r["label"]: r for r in summary["rows"]}
    assert summary["seeds"] == [0, 1] and summary["reference"] == "central"
    assert summary["final_val_loss"]["centralized"] == [
        c["final_val_loss"] for c in sorted(results["cells"].values(), key=lambda c: c["seed"]) if c["arm"] == "central"
    ]
    spes = [c for c in results["cells"].values() if c["arm"] == "spes"]
    chosen = next(c["point"] for c in spes if c["seed"] == 1)  # the point every seed ran
    for i, seed in enumerate((0, 1)):
        fed = next(c for c in spes if c["seed"] == seed and c["point"] == chosen)
        central = next(c for c in results["cells"].values() if c["arm"] == "central" and c["seed"] == seed)
        alone = compare(_run_of(micro_study, fed), _run_of(micro_study, central))
        for group, r in alone["groups"].items():
            assert rows[group]["ratio"][i] == pytest.approx(r["ratio"])
    page = write_page(out, tmp / "docs").read_text()
    assert "Where the gap goes, spes against central" in page and "| router |" in page


def test_a_centralized_arm_with_a_federated_arms_overrides_is_run_too(tmp_path, monkeypatch):
    """The scale study pairs each SPES arm with a centralized one of the same overrides: both run,
    and a cell keyed before the key knew the kind still counts as finished."""
    ran = []

    def record(study, arm, point, seed, runs, threads, commit):
        ran.append((arm.name, seed))
        overrides = cell_overrides(study, arm, point, seed)
        return {"arm": arm.name, "point": point, "seed": seed, "overrides": overrides, "final_val_loss": 1.0}

    monkeypatch.setattr(study_mod, "run_cell", record)
    (tmp_path / "pair.yaml").write_text(
        json.dumps(
            {
                "title": "pair",
                "question": "?",
                "base": ["model=tiny"],
                "seeds": [0, 1],
                "arms": {
                    "spes": {"overrides": ["rounds=2"]},
                    "central": {"kind": "centralized", "overrides": ["rounds=2"]},
                },
            }
        )
    )
    study = load_study(str(tmp_path / "pair.yaml"))
    cells = run_study(study, tmp_path / "out", threads=1)["cells"]
    assert ran == [("spes", 0), ("spes", 1), ("central", 0), ("central", 1)] and len(cells) == 4
    # An older JSON: a cell under the key of its overrides alone (the same as its federated twin's
    # would have been), the twin not run yet: the twin runs and the older cell stays.
    legacy = {cell_id(c["overrides"]): c for c in cells.values() if c["arm"] == "central"}
    (tmp_path / "out" / "pair.json").write_text(json.dumps({"cells": legacy}))
    ran.clear()
    again = run_study(study, tmp_path / "out", threads=1)["cells"]
    assert ran == [("spes", 0), ("spes", 1)] and len(again) == 4


def test_micro_study_page_reports_paired_ratios(micro_study):
    _, results, tmp = micro_study
    page = write_page(tmp / "out", tmp / "docs").read_text()
    spes = sorted(
        (
            c
            for c in results["cells"].values()
            if c["arm"] == "spes"
            and c["seed"] in (0, 1)
            and sum(1 for d in results["cells"].values() if d["point"] == c["point"]) == 2
        ),
        key=lambda c: c["seed"],
    )
    central = {c["seed"]: c["final_val_loss"] for c in results["cells"].values() if c["arm"] == "central"}
    m, s = mean_std([c["final_val_loss"] / central[c["seed"]] for c in spes])
    assert f"{m:.4f} ± {s:.4f}" in page
    assert (tmp / "docs" / "study_micro.png").stat().st_size > 0


def test_page_says_how_far_a_study_got(micro_study):
    _, results, tmp = micro_study
    assert planned_runs(results) == 5  # 2 grid points on seed 0, the best on seed 1, centralized on seeds 0 and 1
    assert progress_line(results) == "Complete: all 5 planned runs."
    partial = {**results, "cells": dict(list(results["cells"].items())[:3])}
    assert progress_line(partial).startswith("**In progress: 3 of 5 planned runs.**")


def test_readme_line_pairs_the_first_arm_with_the_others(micro_study):
    _, results, _ = micro_study
    by_arm = {
        a: sorted((c for c in results["cells"].values() if c["arm"] == a), key=lambda c: c["seed"])
        for a in ("spes", "central")
    }
    best = [c for c in by_arm["spes"] if sum(d["point"] == c["point"] for d in by_arm["spes"]) == 2]
    m, s = mean_std([c["final_val_loss"] / r["final_val_loss"] for c, r in zip(best, by_arm["central"])])
    (line,) = readme_lines(results)
    assert f"spes / central {m:.4f} ± {s:.4f}" in line and "in progress" not in line
    block = replace_readme_block(f"a\n{README_BEGIN}\nold\n{README_END}\nb", "NEW")
    assert block == "a\nNEW\nb"


def test_wan_page_is_the_rendering_of_its_committed_json(tmp_path):
    from bench.wan_report import write_wan_page

    root = Path(__file__).resolve().parent.parent
    out = json.loads((root / "benchmarks" / "wan.json").read_text())
    page = write_wan_page(out, tmp_path)
    assert page.read_text() == (root / "docs" / "wan.md").read_text(), "stale docs/wan.md: python -m bench.wan"
    assert (tmp_path / "wan.png").stat().st_size > 0


def test_wan_runs_as_a_command():
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "bench.wan", "--help"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: python -m bench.wan" in done.stdout


def test_wan_model_scales_a_codecs_bytes_and_syncs_by_its_measured_ratios():
    from bench.wan import H_AT_SCALE, _time, codec_sync_ratios

    def cell(arm, seed, curve):
        return {"arm": arm, "point": None, "seed": seed, "final_val_loss": curve[-1], "val_loss_by_round": curve}

    study = {
        "arms": {"spes": {}, "spes-topk2": {}},
        "cells": {
            "a": cell("spes", 0, [8.0, 6.0, 4.0]),
            "b": cell("spes", 1, [8.0, 6.0, 4.0]),
            "c": cell("spes-topk2", 0, [8.0, 7.0, 5.0]),
            "d": cell("spes-topk2", 1, [8.0, 7.0, 5.0]),
        },
    }
    # Target 5.0 (the worse final mean): SPES fp32 reaches it 1.5 syncs in (6 -> 4 crosses 5 halfway),
    # top-k after 2 syncs: 2 / 1.5.
    assert codec_sync_ratios(study) == {"spes_topk2": pytest.approx(2 / 1.5)}
    assert codec_sync_ratios(None) == {}
    b = {"spes_up": 1e9, "spes_down": 3e9, "full_up": 4e9, "full_down": 4e9}
    got = _time("spes_topk2", b, 1e9, 0.05, 0.5, {"spes_topk2": 10.0}, {"spes_topk2": 0.01}, 4)
    comm = (1e9 + 3e9) * 0.01 * 8 / 1e9 + 2 * 0.05  # 0.32 s of bytes plus a round trip
    per = H_AT_SCALE * 0.5 + comm
    assert got == {"round_s": pytest.approx(per), "comm_share": pytest.approx(comm / per), "hours": 10 * per / 3600}


def test_streaming_clock_waits_only_for_what_the_overlap_does_not_hide():
    from bench.wan_streaming import streaming_clock

    # 4 fragments of 2, 1, 1, 4 GB (8 GB in all) at 1 Gbit/s (8 s per GB), no latency, 0.5 s steps, H = 100.
    got = streaming_clock([2e9, 1e9, 1e9, 4e9], 8e9, 0.5, 1e9, 0.0, 100, 5)
    assert got["spes_s"] == pytest.approx(50 + 64)  # 100 steps, then 64 s of bytes
    assert got["fragments_s"] == pytest.approx(50 + 16 + 8 + 8 + 32)  # the same bytes, in four waits
    assert got["overlap_s"] == pytest.approx(50 + 13.5 + 5.5 + 5.5 + 29.5)  # each hides 5 x 0.5 s
    assert got["overlap_max_s"] == pytest.approx(50 + 4 + 0 + 0 + 20)  # each hides 24 x 0.5 s at most
    assert got["peak_over_spes"] == 0.5 and got["steps_per_round"] == 25


def test_traffic_per_node_is_the_steady_mean_and_the_largest_exchange_after_round_1():
    from bench.runs import traffic_per_node
    from strategy.round_record import RoundRecord

    def rnd(n, alpha, *nodes):
        return RoundRecord(
            n, merge_alpha=alpha, nodes={str(i): {"bytes_up": u, "bytes_down": d} for i, (u, d) in enumerate(nodes)}
        )

    rounds = [
        rnd(1, 0.0, (1, 100), (1, 100)),
        rnd(2, 0.5, (1, 10), (3, 10)),
        rnd(3, 0.0, (1, 50), (1, 50)),
        rnd(4, 0.0, (2, 20), (2, 20)),
    ]
    # Steady: rounds 2 and 4 (each after a round without a merge): (11 + 13 + 22 + 22) / 4 = 17;
    # largest after round 1: round 3's 51 (after the merge, not steady).
    assert traffic_per_node(rounds) == {"bytes_steady_round_node": 17.0, "bytes_peak_round_node": 51}
    assert traffic_per_node(rounds[:1]) == {"bytes_steady_round_node": None, "bytes_peak_round_node": None}


def test_refresh_traffic_recomputes_a_cells_bytes_from_its_run(micro_study):
    study, results, tmp = micro_study
    out = tmp / "out"
    path = out / f"{study.name}.json"
    fed = [k for k, c in results["cells"].items() if c["kind"] == "federated"]
    assert all(results["cells"][k]["bytes_steady_round_node"] > 0 for k in fed)
    stripped = json.loads(path.read_text())
    for k in fed:
        stripped["cells"][k].pop("bytes_steady_round_node")
        stripped["cells"][k].pop("bytes_peak_round_node")
    path.write_text(json.dumps(stripped))
    assert study_mod.refresh_traffic(study, out) == len(results["cells"])
    again = json.loads(path.read_text())["cells"]
    for k in fed:
        assert again[k]["bytes_steady_round_node"] == results["cells"][k]["bytes_steady_round_node"]
        assert again[k]["bytes_peak_round_node"] == results["cells"][k]["bytes_peak_round_node"]
