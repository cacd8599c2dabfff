"""Faults and hostile input, each built by hand and fed through the real code (faults.cases).

The quick cases go through the real SpesStrategy, node settings and node state store; the two
process cases start real Flower processes on 127.0.0.1 (bounded, stopped by PID).
"""

import math

import pytest
import torch

from faults import cases as faults


@pytest.mark.parametrize("case", faults.QUICK, ids=lambda c: getattr(c, "__name__", "case"))
def test_fault_is_contained(case):
    outcome = case()
    assert outcome.ok, f"{outcome.fault}: {outcome.now}"


def test_every_quick_case_has_a_name_of_its_own_for_k():
    names = [c.__name__ for c in faults.QUICK]
    assert len(set(names)) == len(names) and all(n.startswith("case_") and n != "case_" for n in names)
    assert "case_num_tokens_minus_99" in names  # the fault in words: `pytest -k num_tokens_minus_99`


def test_token_weights_are_bounded_by_what_a_round_can_produce():
    from flwr.app import MetricRecord, RecordDict

    from common.codec import encode

    s, before, _ = faults.strategy_round(
        lambda u, m: RecordDict({"arrays": encode(u), "metrics": MetricRecord({**m, "num-tokens": 1001.0})}),
        max_tokens=1000.0,
    )
    assert s.history[-1].nodes["1"]["status"].startswith("rejected: num-tokens 1001")
    # 1000 tokens is exactly the most a round can produce: accepted, and weighted 1000:500.
    s, before, replies = faults.strategy_round(
        lambda u, m: RecordDict({"arrays": encode(u), "metrics": MetricRecord({**m, "num-tokens": 1000.0})}),
        max_tokens=1000.0,
    )
    name = "model.norm.weight"
    expected = (500 * (before[name] + 0.01) + 1000 * (before[name] + 0.02)) / 1500
    torch.testing.assert_close(s.params[name], expected)


def test_uniform_weighting_is_the_plain_mean():
    from flwr.app import MetricRecord, RecordDict

    from common.codec import encode

    s, before, _ = faults.strategy_round(
        lambda u, m: RecordDict({"arrays": encode(u), "metrics": MetricRecord({**m, "num-tokens": 50.0})}),
        shared_weighting="uniform",
    )
    name = "model.norm.weight"
    torch.testing.assert_close(s.params[name], before[name] + 0.015)


def test_trimmed_mean_drops_the_outlier():
    from strategy.aggregation import trimmed_mean

    copies = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 6.0]), torch.tensor([3.0, 7.0]), torch.tensor([1e6, -1e6])]
    # n=4, trim 0.25 -> drop 1 per side per entry: [2, 3] and [5, 6] remain.
    torch.testing.assert_close(trimmed_mean(copies, 0.25), torch.tensor([2.5, 5.5], dtype=torch.float64))


def test_below_quorum_round_leaves_model_unchanged():
    from flwr.app import MetricRecord, RecordDict

    from common.codec import encode

    def poison(update, metrics):
        return RecordDict({"arrays": encode(update), "metrics": MetricRecord({**metrics, "num-tokens": math.nan})})

    s, before, _ = faults.strategy_round(poison, min_nodes=2)
    rec = s.history[-1]
    assert not rec.applied and rec.valid_updates == 1 and s.failed_rounds == 1
    assert all(torch.equal(s.params[n], before[n]) for n in before)
    assert all(s.needs_full.values())  # nobody's experts are what they last sent


def test_supernode_sigkilled_mid_round_run_completes(tmp_path):
    from faults.runs import supernode_killed_mid_round

    ok, detail = supernode_killed_mid_round(tmp_path)
    assert ok, detail


def test_coordinator_killed_and_resumed_is_bit_identical(tmp_path):
    from faults.runs import resume_matches_uninterrupted

    ok, detail = resume_matches_uninterrupted(tmp_path)
    assert ok, detail


def test_dead_simulation_worker_is_replaced(tmp_path):
    from faults.runs import simulation_worker_killed

    ok, detail = simulation_worker_killed(tmp_path)
    assert ok, detail


def test_sign_flipping_node_is_dropped_then_quarantined_and_honest_run_keeps_everyone(tmp_path):
    """A real 4-node run with one node sending -1 x its honest update: the guard drops it in round 1
    (it pulls against the others), quarantines it at its second strike; the honest run drops nobody."""
    from faults.attacks import ATTACKS, caught, honest_drops, run_attacks

    flip = next(a for a in ATTACKS if a.name == "update scaled x-1")
    flip.rounds = 3
    try:
        row = run_attacks(tmp_path, [flip])[0]
    finally:
        flip.rounds = 10
    assert caught(tmp_path / "attack0") == "dropped from round 1 (2 rounds); quarantined in round 2", row
    assert honest_drops(tmp_path / "honest0") == 0 and row["honest_dropped"] == 0
    assert math.isfinite(row["attacked_loss"]) and abs(row["gap"]) < 0.05, row


def test_reliability_attack_block_is_the_rendering_of_its_json():
    import json

    from faults.attacks import BLOCK, render

    result = json.loads((faults.ROOT / "benchmarks" / "attacks.json").read_text())
    doc = (faults.ROOT / "docs" / "reliability.md").read_text()
    assert BLOCK[0] + doc.split(BLOCK[0], 1)[1].split(BLOCK[1], 1)[0] + BLOCK[1] == render(result)


def test_killing_the_launcher_stops_every_process_it_started(tmp_path):
    """SIGKILL `python -m sim` (Flower engine) mid-run: its watchdog stops the SuperLink, SuperExec, the
    simulation and Ray within seconds, so nothing goes on writing into the run folder."""
    import os
    import signal
    import time
    import uuid

    from engine.processes import scan_processes
    from faults.runs import MICRO, start_sim

    marker = f"SPES_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    run_dir = tmp_path / "kt"
    args = ["nodes=2", "rounds=30", "strategy.local_steps=3", *MICRO, "run_name=kt", f"output_dir={tmp_path}"]
    proc = start_sim(args, env)
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        proc.kill()  # SIGKILL: no handler, no cleanup in the launcher
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while scan_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = scan_processes(marker)
        rounds = len(metrics.read_text().splitlines())
        time.sleep(5)
        assert left == [] and len(metrics.read_text().splitlines()) == rounds < 30
    finally:
        for pid in scan_processes(marker):
            os.kill(pid, signal.SIGKILL)


def test_honest_bounds_measurement_reads_every_nodes_scale(tmp_path):
    """python -m faults.bounds's measurement on a micro run: every node-round has a finite scale and
    cosine, and with nothing clipped an honest shared update stays under the default factor."""
    from faults.bounds import measure
    from faults.runs import MICRO

    r = measure("micro", ["nodes=3", "rounds=2", "strategy.local_steps=3", *MICRO], tmp_path)
    assert r["node_rounds"] == 6
    assert 1.0 <= r["shared_max"] < 4.0 and r["expert_max"] >= 1.0 and 0.0 < r["cosine_min"] <= 1.0, r
