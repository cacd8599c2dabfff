"""LoRA on the shared backbone: fewer trainable parameters, merged export loads in stock transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from model import MoEArgs, build_model
from model.lora import (
    LoraArgs,
    adapter_param_names,
    adapter_shapes,
    apply_lora,
    init_adapters,
    lora_args,
    merge_adapters,
    merge_and_export,
    split_adapters,
)
from model.naming import expert_param_names, is_adapter_name, peft_to_plain, plain_to_peft, trained_param_names
from training.trainer import TrainConfig, make_optimizer, train_steps

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB, RANK = 61, 4
HEAD_DIM = 32 // 4


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (2, 17), generator=g)


def test_lora_trains_adapters_owned_experts_routers_and_norms_only(tmp_path):
    full = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    full_trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    model = apply_lora(build_model(ARGS, VOCAB, owned=[0, 1], seed=0), LoraArgs(rank=RANK, alpha=8))
    # Adapters: rank x (in + out) per projection; q/o are 32 -> 32, k/v 32 -> 2 kv heads x 8 = 16.
    q = k = 32
    kv = 2 * HEAD_DIM
    per_layer = RANK * ((q + 32) + (k + kv) + (k + kv) + (32 + q))
    adapters = adapter_param_names(model)
    assert sum(dict(model.named_parameters())[n].numel() for n in adapters) == ARGS.num_layers * per_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, _ in model.named_parameters()]
    assert set(expert_param_names(trainable, range(8))) == set(expert_param_names(names, [0, 1]))
    assert not any("embed_tokens" in n or "lm_head" in n or "base_layer" in n for n in trainable)
    assert all(n in trainable for n in names if n.endswith(".mlp.gate.weight"))
    lora_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_trainable < full_trainable, (lora_trainable, full_trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, warmup_steps=0)
    opt = make_optimizer(model, cfg)
    train_steps(model, opt, batches(), cfg, 0, 2, 2, torch.device("cpu"))
    after = dict(model.named_parameters())
    frozen = [n for n in names if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in adapters if ".lora_B." in n)
    assert {id(p) for p in opt.state} == {id(p) for n, p in model.named_parameters() if n in trainable}

    model.eval()
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=x).logits
    out = merge_and_export(model, tmp_path / "merged")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock).__name__ == "Qwen3MoeForCausalLM"
    assert not any("lora" in n for n in stock.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [({"rank": 0}, "rank must be >= 1"), ({"targets": ["gate_proj"]}, "targets")])
def test_bad_lora_args(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraArgs(**bad).validate()


# -- plain names, fresh adapters and the merge (what the coordinator holds and exports) -----------------

TARGETS = ["q_proj", "v_proj"]


def test_peft_names_map_to_plain_names_and_back():
    base = build_model(ARGS, VOCAB, owned=[0], seed=0)
    base_names = list(base.state_dict())
    peft_model = apply_lora(build_model(ARGS, VOCAB, owned=[0], seed=0), LoraArgs(rank=RANK, targets=TARGETS))
    peft_names = list(peft_model.state_dict())
    plain = [peft_to_plain(n) for n in peft_names]
    adapters = [
        f"model.layers.{i}.self_attn.{p}.{part}.weight"
        for i in range(2)
        for p in TARGETS
        for part in ("lora_A", "lora_B")
    ]
    assert sorted(plain) == sorted(base_names + adapters)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in plain
    assert "model.layers.0.self_attn.k_proj.weight" in plain  # not targeted: its name is unchanged by peft
    assert [plain_to_peft(n, TARGETS) for n in plain] == peft_names
    inner = list(peft_model.get_base_model().state_dict())
    assert [plain_to_peft(n, TARGETS, prefix=False) for n in plain] == inner
    assert [peft_to_plain(n) for n in inner] == plain
    assert sorted(filter(is_adapter_name, plain)) == sorted(adapters)


def test_trained_param_names_with_and_without_lora():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.0.up_proj.weight",
        "model.layers.0.mlp.experts.1.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert trained_param_names(names, [1], lora=True) == [
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.1.up_proj.weight",
        "model.norm.weight",
    ]
    no_lora = trained_param_names(names, [0], lora=False)
    assert no_lora == [n for n in names if ".experts.1." not in n]


def test_trained_param_names_are_what_apply_lora_leaves_trainable():
    model = apply_lora(build_model(ARGS, VOCAB, owned=[2, 5], seed=0), LoraArgs(rank=RANK), owned=[2, 5])
    trainable = sorted(peft_to_plain(n) for n, p in model.named_parameters() if p.requires_grad)
    plain = [peft_to_plain(n) for n in model.state_dict()]
    assert sorted(trained_param_names(plain, [2, 5], lora=True)) == trainable


def test_fresh_adapters_follow_peft_init():
    base = build_model(ARGS, VOCAB, seed=0)
    args = LoraArgs(rank=RANK, targets=TARGETS)
    fresh = init_adapters(base, args, seed=3)
    peft_model = apply_lora(build_model(ARGS, VOCAB, seed=0), args)
    peft_adapters = {peft_to_plain(n): p for n, p in peft_model.named_parameters() if ".lora_" in n}
    assert {n: t.shape for n, t in fresh.items()} == {n: t.shape for n, t in peft_adapters.items()}
    assert {n: tuple(t.shape) for n, t in fresh.items()} == adapter_shapes(base, args)
    for name, t in fresh.items():
        if ".lora_B." in name:
            assert not t.any()  # the adapted model starts as the base model
        else:  # kaiming-uniform(a=sqrt(5)) over in_features = 32: bound 1/sqrt(32)
            assert t.abs().max() <= 32**-0.5 and t.std() > 0.5 * 32**-0.5 / 3**0.5
    assert all(torch.equal(fresh[n], init_adapters(base, args, seed=3)[n]) for n in fresh)


def test_merged_weights_give_the_logits_of_the_peft_model():
    args = LoraArgs(rank=RANK, alpha=8.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = apply_lora(build_model(ARGS, VOCAB, seed=0), args).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 after init would make the merge trivial
        for n, p in peft_model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randint(0, VOCAB, (2, 20), generator=g)
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
    plain = {peft_to_plain(n): t for n, t in peft_model.state_dict().items()}
    merged = merge_adapters(plain, args)
    assert not any(is_adapter_name(n) for n in merged)
    q = "model.layers.1.self_attn.q_proj"
    by_hand = plain[f"{q}.weight"] + (8.0 / RANK) * plain[f"{q}.lora_B.weight"] @ plain[f"{q}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{q}.weight"], by_hand, rtol=1e-6, atol=1e-6)
    plain_model = build_model(ARGS, VOCAB, seed=1).eval()
    plain_model.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain_model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_refuses_incomplete_adapters():
    base = build_model(ARGS, VOCAB, seed=0)
    args = LoraArgs(rank=RANK, targets=TARGETS)
    params = {**base.state_dict(), **init_adapters(base, args, seed=0)}
    del params["model.layers.0.self_attn.v_proj.lora_B.weight"]
    with pytest.raises(KeyError, match="v_proj"):
        merge_adapters(params, args)
    no_adapter = {
        n: t for n, t in params.items() if "layers.1.self_attn.q_proj.lora" not in n and "v_proj.lora" not in n
    }
    with pytest.raises(KeyError, match="without an adapter"):
        merge_adapters(no_adapter, args)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_rank", -1, "train.lora_rank must be an integer >= 0"),
        ("lora_rank", 2.5, "train.lora_rank"),
        ("lora_alpha", 0.0, "train.lora_alpha must be a finite number > 0"),
        ("lora_alpha", float("nan"), "train.lora_alpha"),
        ("lora_targets", "q_proj,gate_proj", r"unknown: \['gate_proj'\]"),
        ("lora_targets", "", "train.lora_targets must name distinct projections"),
        ("lora_targets", "q_proj,q_proj", "distinct"),
        ("lora_targets", ["q_proj"], "comma-separated string"),
    ],
)
def test_train_config_rejects_bad_lora_settings(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value}).validate()


def test_lora_args_from_train_config():
    assert lora_args(TrainConfig()) is None
    args = lora_args(TrainConfig(lora_rank=4, lora_alpha=8, lora_targets=" q_proj, o_proj "))
    assert (args.rank, args.alpha, list(args.targets), args.scaling) == (4, 8.0, ["q_proj", "o_proj"], 2.0)


def test_resume_takes_only_the_adapters_this_run_makes():
    base = build_model(ARGS, VOCAB, seed=0)
    args = LoraArgs(rank=RANK, targets=TARGETS)
    adapters = init_adapters(base, args, seed=0)
    params = {**base.state_dict(), **adapters}
    got_base, got_adapters = split_adapters(params, args, base)
    assert set(got_base) == set(base.state_dict()) and set(got_adapters) == set(adapters)
    plain_base, none = split_adapters(base.state_dict(), None, base)
    assert set(plain_base) == set(base.state_dict()) and none == {}
    with pytest.raises(ValueError, match="8 LoRA adapter tensors, but train.lora_rank=0 and train.lora_targets make 0"):
        split_adapters(params, None, base)  # a LoRA checkpoint resumed without LoRA
    with pytest.raises(ValueError, match="other names or shapes"):
        split_adapters(params, LoraArgs(rank=2, targets=TARGETS), base)
    with pytest.raises(ValueError, match="0 LoRA adapter tensors, but train.lora_rank=4"):
        split_adapters(base.state_dict(), args, base)
