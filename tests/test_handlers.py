"""The ClientApp's handlers (client_app/handlers.py) as themselves, on the content a coordinator sends.

Setup, then a train message carrying the federation's routing bias and expert load: the bias
steers the node's top-k choice (a bias of 10 on one expert puts it among every token's picks,
so its share of layer 0's picks is exactly 1/top_k), and the federation's load enters the
balancing loss. Micro model, 2 local steps, no Flower runtime.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, RecordDict

from client_app import background_save, handlers, resident
from common import keys
from common.codec import encode
from common.spec import from_dict
from data import load_tokenizer
from data.tokenizer import tokenizer_to_json
from model import build_model
from server_app.config import compose

E, L, TOP_K = 4, 2, 2
BASE = [
    "model.hidden_size=32",
    "model.expert_ffn=16",
    "model.num_layers=2",
    f"model.num_experts={E}",
    f"model.top_k={TOP_K}",
    "strategy.merge.enabled=false",
    "data.vocab_size=300",
    "data.seq_len=16",
    "train.batch_size=4",
    "strategy.local_steps=2",
    "train.balance_global_weight=0.5",
    "nodes=1",
]


@pytest.fixture(autouse=True)
def nothing_kept():
    resident.drop()
    yield
    background_save.drain()
    resident.drop()


def _train(tmp_path, name, extra: dict, overrides: tuple[str, ...] = (), arrays: bool = False) -> dict:
    spec = from_dict(compose([*BASE, *overrides]))
    tok = load_tokenizer(spec.data, tmp_path / "cache")
    node_config = {"partition-id": 0, "num-partitions": 1, "work-dir": str(tmp_path / name)}
    run = {keys.RUN_CONFIG: spec.to_json(), keys.RUN_TOKEN: "run-1", keys.TOTAL_STEPS: spec.total_steps}
    setup = handlers.setup(
        RecordDict({keys.CONFIG: ConfigRecord({**run, keys.TOKENIZER_JSON: tokenizer_to_json(tok)})}), node_config
    )
    reply = dict(setup.config_records[keys.CONFIG])
    assert json.loads(reply.pop(keys.NODE_HARDWARE)) == {
        "device": "cpu",
        "precision": "fp32",
        "optimizer": "adamw",
        "lean_loss": False,
        "activation_checkpointing": False,
        "threads": spec.train.threads,
        "set-by-node": [],
    }
    assert reply == {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 1, keys.STATE_STEP: -1}
    order = {keys.OWNED_EXPERTS: [0, 1], keys.FULL_MODEL: True, keys.GLOBAL_STEP: 0, keys.LOCAL_STEPS: 2}
    if spec.strategy.delta_sync:  # a full resync: every tensor whole
        order |= {keys.BASE_STEP: -1, keys.APPLY_OWN: False}
    content = RecordDict(
        {
            keys.CONFIG: ConfigRecord({**run, **order, **extra}),
            keys.ARRAYS: encode(build_model(spec.model, len(tok), seed=0).state_dict()),
        }
    )
    reply = handlers.train(content, node_config)
    return dict(reply.array_records[keys.ARRAYS]) if arrays else dict(reply.metric_records[keys.METRICS])


def test_train_handler_routes_with_the_federations_bias_and_balances_with_its_load(tmp_path):
    plain = _train(tmp_path, "plain", {})
    bias = [0.0] * (L * E)
    bias[3] = 10.0  # layer 0, expert 3
    biased = _train(tmp_path, "biased", {keys.ROUTER_BIAS: bias})
    load = [1.0, 0.0, 0.0, 0.0] * L  # every token of the federation went to expert 0
    loaded = _train(tmp_path, "loaded", {keys.GLOBAL_LOAD: load})

    share = biased[keys.EXPERT_LOAD]
    assert len(share) == L * E and share[3] == pytest.approx(1 / TOP_K)
    assert plain[keys.EXPERT_LOAD][3] != pytest.approx(1 / TOP_K)
    # The federation's load is mixed into f_i (weight 0.5): only the balancing loss changes at step 0.
    assert loaded["aux-loss"] != pytest.approx(plain["aux-loss"], rel=1e-4)
    assert plain[keys.NUM_TOKENS] == loaded[keys.NUM_TOKENS] == 2 * 4 * 16


def test_train_handler_refuses_a_malformed_bias_or_load(tmp_path):
    with pytest.raises(ValueError, match="router-bias must be a list of 2 x 4 numbers"):
        _train(tmp_path, "short", {keys.ROUTER_BIAS: [0.0] * 3})
    with pytest.raises(ValueError, match="global-expert-load must hold numbers only"):
        _train(tmp_path, "text", {keys.GLOBAL_LOAD: ["x"] * (L * E)})


def test_train_handler_sends_the_fragment_it_is_told_and_refuses_a_bad_one(tmp_path):
    from model.naming import fragment_of

    fragments = ("strategy.delta_sync=true", "strategy.fragments=2")
    sent = _train(tmp_path, "f1", {keys.SYNC_FRAGMENT: 1}, fragments, arrays=True)
    assert sent and {fragment_of(k.partition("#")[0], 2) for k in sent} == {1}
    with pytest.raises(ValueError, match="sync-fragment=2; the run has 2 fragments"):
        _train(tmp_path, "f2", {keys.SYNC_FRAGMENT: 2}, fragments)
    with pytest.raises(ValueError, match="received sync-fragment=None; expected an integer >= 0"):
        _train(tmp_path, "none", {}, fragments)
