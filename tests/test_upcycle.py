"""Upcycling a dense Qwen3 / Llama-style model into the partitioned Qwen3-MoE (no downloads)."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from model import MoEArgs, count_parameters
from model.export import save_hf_atomic
from model.naming import expert_param_names
from model.upcycle import upcycle_dense, upcycle_from_args
from server_app.config import compose

VOCAB, HIDDEN, INTER, LAYERS = 101, 32, 24, 2
ARGS = MoEArgs(
    hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, expert_ffn=INTER
)
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def dense_qwen3(tie=True, seed=0):
    """A random dense Qwen3 whose norms are not all ones, so copying them is actually tested."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=tie, **SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(n=2, length=16):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("router_init", ["zeros", "normal", "down_proj_std"])
def test_without_noise_the_moe_computes_the_dense_logits(router_init):
    dense = dense_qwen3()
    moe = upcycle_dense(dense, ARGS, noise_std=0.0, noise_fraction=0.5, router_init=router_init, seed=0).eval()
    x = tokens()
    with torch.no_grad():
        want, got = dense(input_ids=x).logits, moe(input_ids=x).logits
    assert want.abs().max() > 1.0  # logits of a real size: equality below is not trivial
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert moe.config.norm_topk_prob and not moe.config.tie_word_embeddings
    sd = dict(moe.named_parameters())
    torch.testing.assert_close(sd["lm_head.weight"], dense.model.embed_tokens.weight)  # tied dense head
    router = sd["model.layers.1.mlp.gate.weight"]
    if router_init == "zeros":
        assert torch.count_nonzero(router) == 0
    elif router_init == "down_proj_std":
        want_std = float(dense.model.layers[1].mlp.down_proj.weight.detach().std())
        assert float(router.std()) == pytest.approx(want_std, rel=0.25)  # 128 samples


def test_experts_are_copies_of_the_dense_mlp_and_noise_hits_the_asked_fraction():
    dense = dense_qwen3()
    clean = upcycle_dense(dense, ARGS, noise_std=0.0, router_init="normal", seed=0)
    for e in range(ARGS.num_experts):
        expert = clean.model.layers[0].mlp.experts[e]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(expert, proj).weight, getattr(dense.model.layers[0].mlp, proj).weight)
    noisy = upcycle_dense(dense, ARGS, noise_std=0.02, noise_fraction=0.5, router_init="normal", seed=1)
    deltas = [
        noisy.model.layers[0].mlp.experts[e].gate_proj.weight - dense.model.layers[0].mlp.gate_proj.weight
        for e in range(ARGS.num_experts)
    ]
    for d in deltas:
        changed = d[d != 0]
        assert 0.4 < changed.numel() / d.numel() < 0.6  # 768 entries, asked 50 %
        assert float(changed.std()) == pytest.approx(0.02, rel=0.15)
    assert not torch.equal(deltas[0], deltas[1])  # copies differ: the symmetry is broken
    again = upcycle_dense(dense, ARGS, noise_std=0.02, noise_fraction=0.5, router_init="normal", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(noisy.state_dict().values(), again.state_dict().values()))


def test_owned_experts_trainable_and_export_loads_in_stock_transformers(tmp_path):
    dense = dense_qwen3(tie=False)
    moe = upcycle_dense(dense, ARGS, noise_std=0.0, router_init="zeros", owned=[1, 2]).eval()
    names = [n for n, p in moe.named_parameters() if p.requires_grad]
    assert set(expert_param_names(names, range(4))) == set(expert_param_names(names, [1, 2]))
    stock = AutoModelForCausalLM.from_pretrained(save_hf_atomic(moe, tmp_path / "moe")).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, dense(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_from_args_loads_a_dense_checkpoint_dir(tmp_path):
    dense = dense_qwen3()
    dense.save_pretrained(tmp_path / "dense")
    args = MoEArgs(
        **{
            **ARGS.to_dict(),
            "init": "upcycle",
            "dense_path": str(tmp_path / "dense"),
            "vocab_size": VOCAB,
            "upcycle_router_init": "down_proj_std",
        }
    )
    args.validate()
    moe = upcycle_from_args(args, seed=0).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, dense(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_shape_mismatch_names_the_key():
    with pytest.raises(ValueError, match=r"model.expert_ffn: dense 24 vs MoE 32"):
        upcycle_dense(dense_qwen3(), MoEArgs(**{**ARGS.to_dict(), "expert_ffn": 32}))
    with pytest.raises(ValueError, match=r"model.rope_theta: dense 10000.0 vs MoE 1000000.0"):
        upcycle_dense(dense_qwen3(), MoEArgs(**{**ARGS.to_dict(), "rope_theta": 1e6}))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"init": "upcycle"}, "model.init=upcycle needs model.dense_path"),
        ({"init": "upcycle", "dense_path": "/x"}, "needs model.vocab_size set"),
        ({"init": "copy"}, r"model.init must be one of \['random', 'upcycle'\]"),
        ({"upcycle_router_init": "ones"}, "model.upcycle_router_init must be one of"),
        ({"upcycle_noise_fraction": 1.5}, r"model.upcycle_noise_fraction must be in \[0, 1\]"),
    ],
)
def test_bad_upcycle_args_fail_with_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        MoEArgs(**{**ARGS.to_dict(), **change}).validate()


def test_llama_style_dense_model_upcycles_with_unit_qk_norm():
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SHAPE.items()), tie_word_embeddings=False)
    dense = LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe = upcycle_dense(dense, ARGS, noise_std=0.0, router_init="zeros").eval()
    assert any("no q/k-norm" in str(w.message) for w in caught)
    layer = moe.model.layers[1]
    assert torch.equal(layer.self_attn.q_proj.weight, dense.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(layer.mlp.experts[3].down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(layer.self_attn.q_norm.weight, torch.ones(8))
    assert torch.equal(moe.lm_head.weight, dense.lm_head.weight)


def test_9b_preset_upcycles_from_a_qwen3_1_7b_shaped_model_on_meta():
    """Qwen3-1.7B's shape (its config.json values); 9b = 8 copies of its MLP per layer."""
    preset = MoEArgs.from_dict(compose(["model=9b"])["model"])
    dense_cfg = Qwen3Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    with torch.device("meta"):
        dense = Qwen3ForCausalLM(dense_cfg)
    moe = upcycle_dense(dense, preset, owned=[0, 1])
    n = sum(p.numel() for p in moe.parameters())
    counts = count_parameters(moe.config)
    assert n == counts["total"]
    # 28 layers x 8 experts x 3 x 2048 x 6144 = 8.46 B in experts, plus 0.97 B shared.
    assert counts["per_expert"] == 28 * 3 * 2048 * 6144
    assert 9.3e9 < n < 9.6e9, f"{n:,}"
    active = counts["shared"] + preset.top_k * counts["per_expert"]
    assert 3.0e9 < active < 3.2e9, f"{active:,}"  # "A3B"
