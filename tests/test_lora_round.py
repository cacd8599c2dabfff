"""LoRA through real node rounds and the real SPES strategy, without Flower's runtime (tiny model, 2 steps).

A node with train.lora_rank > 0 trains and sends exactly adapters + routers + norms + owned
experts under plain names, keeps its optimizer moments under those names, and the coordinator
accepts that and nothing else; the frozen base weights keep their initial value.
"""

import pytest
import torch
from strategy_rounds import play_round

from client_app.local_round import NodeContext
from client_app.node_state import NodeState
from common import keys
from common.spec import from_dict
from model import build_model
from model.lora import init_adapters, lora_args
from server_app.config import compose
from strategy.spes import SpesStrategy

E = 4
BASE = [
    "model.hidden_size=32",
    "model.expert_ffn=16",
    "model.num_layers=1",
    f"model.num_experts={E}",
    "strategy.merge.enabled=false",
    "data.vocab_size=300",
    "data.seq_len=16",
    "train.batch_size=2",
    "nodes=2",
    "strategy.local_steps=2",
    "train.lora_rank=2",
    "train.lora_alpha=4",
    "train.lora_targets='q_proj,v_proj'",
    "train.warmup_steps=0",
]
DELTA = [
    "strategy.delta_sync=true",
    "strategy.uplink_codec=int8",
    "strategy.downlink_codec=int8",
    "strategy.error_feedback=true",
]


def sent_by_hand(owned):
    """What a node owning `owned` sends with LoRA on q/v (1 layer), written out name by name."""
    layer = "model.layers.0"
    names = {f"{layer}.self_attn.{p}.{part}.weight" for p in ("q_proj", "v_proj") for part in ("lora_A", "lora_B")}
    names |= {
        f"{layer}.self_attn.q_norm.weight",
        f"{layer}.self_attn.k_norm.weight",
        f"{layer}.input_layernorm.weight",
        f"{layer}.post_attention_layernorm.weight",
        f"{layer}.mlp.gate.weight",
        "model.norm.weight",
    }
    names |= {f"{layer}.mlp.experts.{e}.{p}.weight" for e in owned for p in ("gate_proj", "up_proj", "down_proj")}
    return names


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tokenizer and the nodes' data cache (`<workdir>/../data-cache`), built once for the module."""
    return shared_setup(tmp_path_factory.mktemp("lora-round"))


def shared_setup(root):
    from data import load_tokenizer

    return root, load_tokenizer(from_dict(compose(BASE)).data, root / "cache")


def make(shared, name, overrides):
    root, tok = shared
    spec = from_dict(compose(BASE + overrides))
    ctxs = [NodeContext(spec, tok, root / f"{name}-node{p}", p, 2, progress=False) for p in (0, 1)]
    model = build_model(spec.model, len(tok), seed=0)
    s = SpesStrategy(spec.strategy, E, {10: 0, 11: 1}, num_rounds=5, max_tokens=2 * 2 * 16, num_layers=1, lora=True)
    s.initialize({**model.state_dict(), **init_adapters(model, lora_args(spec.train), seed=0)})
    return spec, tok, ctxs, s


def test_node_sends_adapters_routers_norms_owned_experts_and_base_stays(shared, flower_task):
    spec, tok, ctxs, s = make(shared, "sends", [])
    initial = {n: t.clone() for n, t in s.params.items()}
    msgs, sent = play_round(s, 1, ctxs)
    assert all(n["status"] == "ok" for n in s.history[-1].nodes.values()), s.history[-1].nodes
    for pid, (reply, metrics) in sent.items():
        want = sent_by_hand(s.experts_of(pid))
        assert set(reply) == want
        assert metrics["trainable-params"] == sum(initial[n].numel() for n in want)
        # Moments saved under plain names, for exactly what was trained (frozen weights have none).
        state = NodeState.load(ctxs[pid].workdir / "state", 2)
        assert {k.partition("::")[0] for k in state.optimizer} == want
        assert all(float(state.optimizer[f"{n}::step"]) == 2 for n in want)
    frozen = [n for n in initial if n not in sent_by_hand(range(E))]
    assert "model.layers.0.self_attn.q_proj.weight" in frozen and "lm_head.weight" in frozen
    assert all(torch.equal(s.params[n], initial[n]) for n in frozen)  # nobody sent them: unchanged
    b = "model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not initial[b].any() and s.params[b].abs().sum() > 0  # the adapters learned
    # The global adapter is the token-weighted mean of the two nodes' copies (equal tokens here).
    torch.testing.assert_close(s.params[b], (sent[0][0][b] + sent[1][0][b]) / 2)

    # Round 2: a sparse downlink (own experts stay on the node); it continues from the saved state.
    msgs, sent = play_round(s, 2, ctxs)
    assert all(not m.content["config"][keys.FULL_MODEL] for m in msgs)
    assert all(n["status"] == "ok" for n in s.history[-1].nodes.values()), s.history[-1].nodes
    state = NodeState.load(ctxs[0].workdir / "state", 4)
    assert float(state.optimizer[f"{b}::step"]) == 4  # moments restored by plain name, then 2 more steps
    assert all(torch.equal(s.params[n], initial[n]) for n in frozen)


def test_strategy_rejects_a_base_attention_weight_with_lora(shared, flower_task):
    spec, tok, ctxs, s = make(shared, "rejects", [])
    q = "model.layers.0.self_attn.q_proj.weight"

    def add_base_weight(pid, reply):
        return {**reply, q: s.params[q] + 0.01} if pid == 0 else reply

    before = s.params[q].clone()
    play_round(s, 1, ctxs, tamper=add_base_weight)
    nodes = s.history[-1].nodes
    assert nodes["0"]["status"].startswith("rejected") and q in nodes["0"]["status"]
    assert nodes["1"]["status"] == "ok"
    assert torch.equal(s.params[q], before)


def test_delta_sync_with_lora_adapters(shared, flower_task):
    spec, tok, ctxs, s = make(shared, "delta", DELTA)
    initial = {n: t.clone() for n, t in s.params.items()}
    for rnd in (1, 2):
        play_round(s, rnd, ctxs)
        rec = s.history[-1]
        assert rec.applied and all(n["status"] == "ok" for n in rec.nodes.values()), rec.nodes
        for ctx in ctxs:  # the node's copy of the model is bit-equal to the coordinator's
            base = NodeState.load(ctx.workdir / "state", 2 * rnd).base
            assert set(base) == set(s.params)
            assert all(torch.equal(base[n], s.sync.shadow[n]) for n in s.params)
    for pid in (0, 1):  # int8 values + one fp32 scale per row, for exactly the LoRA set
        up = sent_by_hand(s.experts_of(pid))
        rows = sum(initial[n].numel() // initial[n].shape[-1] for n in up)
        assert rec.nodes[str(pid)]["bytes_up"] == sum(initial[n].numel() for n in up) + 4 * rows
    assert torch.equal(
        s.params["model.layers.0.self_attn.v_proj.weight"], initial["model.layers.0.self_attn.v_proj.weight"]
    )
    assert s.params["model.layers.0.self_attn.v_proj.lora_B.weight"].abs().sum() > 0
