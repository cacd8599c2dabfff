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
