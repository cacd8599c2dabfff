"""Bad configurations fail before any training, with one clear message."""

import pytest

from server_app.config import ConfigError, load


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nodes=20"], r"E >= N.*E=16, N=20"),
        (["model.top_k=16"], r"model.top_k must be in \[1, num_experts\)"),
        (["strategy.merge.top_k=16"], r"strategy.merge.top_k must be in \[1, num_experts\)"),
        (["model=huge"], r"unknown model preset 'huge'; available: 1b, 7b, 9b, small, tiny"),
        (["data.source=/no/such/corpus.jsonl"], r"'/no/such/corpus.jsonl' does not exist"),
        (["init_from=/no/such/ckpt"], r"init_from checkpoint '/no/such/ckpt' does not exist"),
        (["strategy.local_steps=0"], r"strategy.local_steps must be >= 1"),
        (["train.precision=fp8"], r"train.precision must be fp32 or bf16"),
        (["no_such_key=1"], r"Could not override 'no_such_key'"),
    ],
)
def test_bad_config_fails_with_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(overrides)


def test_defaults_are_the_demo():
    spec = load([])
    assert (spec.nodes, spec.model.name, spec.model.num_experts, spec.strategy_name) == (4, "tiny", 16, "spes")
    assert spec.total_steps == spec.rounds * spec.strategy.local_steps


def test_spec_round_trips_through_json():
    spec = load(["rounds=3", "strategy.merge.enabled=false"])
    again = type(spec).from_json(spec.to_json())
    assert again.raw == spec.raw and again.rounds == 3 and not again.strategy.merge.enabled
