"""The node's training loop (training/trainer.py) against values worked out by hand."""

import math

import pytest
import torch

from model import MoEArgs, build_model
from training.trainer import (
    NonFiniteTraining,
    TrainConfig,
    activation_checkpointing,
    lr_at,
    make_optimizer,
    peak_memory_mb,
    prepare_model,
    process_memory_mb,
    resolve_device,
    train_steps,
)

ARGS = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, expert_ffn=16)
VOCAB = 61


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1e-4),  # warm-up: lr * (step + 1) / warmup
        (4, 5e-4),
        (9, 1e-3),
        (10, 1e-3),  # cosine from its top
        (60, 1e-3 * (0.1 + 0.9 * 0.5)),  # halfway: cos(pi / 2) = 0
        (85, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))),
        (110, 1e-4),  # the floor, min_lr_ratio * lr
        (500, 1e-4),  # and it stays there
    ],
)
def test_learning_rate_schedule_by_hand(step, expected):
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(step, cfg, total_steps=110) == pytest.approx(expected, rel=1e-12)


def test_without_warm_up_the_first_step_has_the_full_rate():
    cfg = TrainConfig(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg, 100) == pytest.approx(2e-3)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0, abs=1e-18)


def test_optimizer_holds_trainable_weights_only_and_decays_matrices_only():
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    cfg = TrainConfig(lr=5e-4, weight_decay=0.2, beta1=0.8, beta2=0.9)
    opt = make_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in decay["params"]} == {id(p) for p in trainable if p.ndim >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in trainable if p.ndim < 2}
    assert no_decay["params"] and decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 5e-4 and decay["betas"] == (0.8, 0.9)
    assert len(trainable) < len(list(model.parameters()))  # the frozen experts are left out


def test_a_module_without_checkpointing_support_reports_none():
    assert activation_checkpointing(torch.nn.Linear(2, 2)) is False
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    assert activation_checkpointing(model) is False
    prepare_model(model, TrainConfig(activation_checkpointing=True))
    assert activation_checkpointing(model) is True


def test_8bit_adamw_is_refused_off_cuda():
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    with pytest.raises(ValueError, match="adamw8bit needs the model on a CUDA device, it is on cpu"):
        make_optimizer(model, TrainConfig(optimizer="adamw8bit"))


def test_each_step_runs_at_its_global_steps_rate_and_counts_its_tokens():
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    opt = make_optimizer(model, cfg)
    seen = []
    opt.register_step_pre_hook(lambda o, _args, _kwargs: seen.append(o.param_groups[0]["lr"]))
    g = torch.Generator().manual_seed(0)
    blocks = iter([torch.randint(0, VOCAB, (3, 17), generator=g) for _ in range(2)])
    m = train_steps(model, opt, blocks, cfg, start_step=7, steps=2, total_steps=50, device=torch.device("cpu"))
    assert seen == [pytest.approx(8e-4), pytest.approx(9e-4)]  # global steps 7 and 8 of the warm-up
    assert m["num-tokens"] == 2 * 3 * 16  # two batches of 3 rows, 16 predicted tokens each
    weighted = m["ce-loss"] + cfg.aux_loss_weight * m["aux-loss"] + cfg.z_loss_weight * m["z-loss"]
    assert m["train-loss"] == pytest.approx(weighted, rel=1e-6)  # means over the steps, each weighted alike


def test_a_non_finite_gradient_stops_the_round_before_the_update():
    model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(warmup_steps=0)
    shared = next(p for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    shared.register_hook(lambda grad: torch.full_like(grad, math.inf))
    block = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteTraining, match="step 3: the gradient norm is inf"):
        train_steps(model, make_optimizer(model, cfg), iter([block]), cfg, 3, 1, 10, torch.device("cpu"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_devices_and_memory_readings():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    rss = process_memory_mb("VmRSS")
    assert rss is not None and rss > 10  # this process holds torch: tens of MiB at least
    assert process_memory_mb("NoSuchField") is None
    assert peak_memory_mb(torch.device("cpu")) >= rss * 0.99  # a peak is at least the current size


def _reference_round(model, blocks, cfg, lrs, start_step, total_steps, owned, global_load):
    """The loop written out plainly: AdamW over the trainable weights (matrices decayed), each
    step at its given rate, the full loss, the gradient clipped at cfg.grad_clip (0: not at all)."""
    from model.loss import lm_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
    losses, counts = [], 0
    for i, (block, lr) in enumerate(zip(blocks, lrs, strict=True)):
        for group in opt.param_groups:
            group["lr"] = lr
        parts = lm_loss(
            model,
            block,
            cfg.aux_loss_weight,
            cfg.z_loss_weight,
            balance=cfg.balance,
            logit_z_weight=cfg.logit_z_loss_weight,
            local_decay=cfg.local_decay(),
            owned=owned,
            step=start_step + i,
            total_steps=total_steps,
            global_load=global_load,
            global_weight=cfg.balance_global_weight,
        )
        losses.append([float(t.detach()) for t in (parts.total, parts.ce, parts.aux, parts.z)])
        counts = counts + parts.expert_counts
        parts.total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad()
    return torch.tensor(losses, dtype=torch.float64).mean(0).tolist(), counts


@pytest.mark.parametrize(
    "cfg",
    [
        # clipped, the owned experts' counts decayed in the balancing loss, the federation's load mixed in
        TrainConfig(
            lr=1e-2,
            warmup_steps=2,
            min_lr_ratio=0.1,
            grad_clip=0.05,
            weight_decay=0.3,
            aux_loss_weight=0.2,
            z_loss_weight=0.05,
            logit_z_loss_weight=0.01,
            balance_local_decay=True,
            balance_local_start=0.3,
            balance_local_every=1,
            balance_global_weight=0.5,
        ),
        # not clipped at all, the pooled balancing loss
        TrainConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, grad_clip=0.0, balance="pooled", aux_loss_weight=0.3),
    ],
    ids=["clipped-decayed-global", "unclipped-pooled"],
)
def test_a_round_equals_the_loop_written_out_by_hand(cfg):
    owned = [2, 5]
    model = build_model(ARGS, VOCAB, owned=owned, seed=3)
    reference = build_model(ARGS, VOCAB, owned=owned, seed=3)
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, VOCAB, (3, 13), generator=g) for _ in range(3)]
    load = torch.softmax(torch.randn(ARGS.num_layers, ARGS.num_experts, generator=g), dim=-1)
    global_load = load if cfg.balance_global_weight > 0 else None
    # global steps 1, 2, 3 of 6: the last warm-up step, the top of the cosine, a quarter down it
    lrs = [1e-2 * 2 / 2, 1e-2, 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))]
    m = train_steps(
        model, make_optimizer(model, cfg), iter(blocks), cfg, 1, 3, 6, torch.device("cpu"), global_load=global_load
    )
    means, counts = _reference_round(reference, blocks, cfg, lrs, 1, 6, owned, global_load)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name
    moved = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in moved)  # the owned experts trained too
    got = [m["train-loss"], m["ce-loss"], m["aux-loss"], m["z-loss"]]
    assert got == pytest.approx(means, rel=1e-6)
    assert m["expert-load"] == pytest.approx((counts / counts.sum(1, keepdim=True)).flatten().tolist(), abs=1e-7)
    assert m["num-tokens"] == 3 * 3 * 12
    assert m["tokens-per-s"] == pytest.approx(m["num-tokens"] / m["train-seconds"], rel=1e-9)
    assert m["peak-mem-mb"] >= process_memory_mb("VmRSS") * 0.5


def test_a_rounds_peak_memory_starts_at_the_current_size():
    from training.trainer import reset_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(40_000_000)  # 160 MB
    del big
    before = peak_memory_mb(cpu)
    assert before >= process_memory_mb("VmRSS") + 100
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) == pytest.approx(process_memory_mb("VmRSS"), abs=20)  # the window restarted


def test_preparing_a_model_stores_frozen_experts_in_bf16_and_compiles_each_layer_once():
    from model.experts import expert_modules

    model = build_model(ARGS, VOCAB, owned=[1], seed=0)
    prepare_model(model, TrainConfig(precision="bf16", compile=True))
    for m in expert_modules(model):
        assert m[1].gate_proj.weight.dtype == torch.float32  # owned: trained and sent in fp32
        assert {m[e].down_proj.weight.dtype for e in m.frozen} == {torch.bfloat16}
    compiled = [layer._compiled_call_impl for layer in model.model.layers]
    assert all(c is not None for c in compiled)
    prepare_model(model, TrainConfig(precision="bf16", compile=True))  # idempotent: nothing compiled again
    assert [layer._compiled_call_impl for layer in model.model.layers] == compiled
    plain = build_model(ARGS, VOCAB, owned=[1], seed=0)
    prepare_model(plain, TrainConfig())
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert all(layer._compiled_call_impl is None for layer in plain.model.layers)


def test_each_step_moves_the_progress_bar_by_one_and_shows_its_loss_and_rate():
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, []

        def update(self, k):
            self.n += k

        def set_postfix(self, **kwargs):
            self.postfix.append(kwargs)

    model = build_model(ARGS, VOCAB, owned=[0], seed=0)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)  # a flat rate
    g = torch.Generator().manual_seed(0)
    blocks = iter([torch.randint(0, VOCAB, (2, 9), generator=g) for _ in range(3)])
    bar = Bar()
    m = train_steps(model, make_optimizer(model, cfg), blocks, cfg, 0, 3, 3, torch.device("cpu"), progress=bar)
    assert bar.n == 3 and [set(p) for p in bar.postfix] == [{"loss", "lr"}] * 3
    assert all(p["lr"] == "1.00e-03" for p in bar.postfix)
    shown = [float(p["loss"]) for p in bar.postfix]
    assert sum(shown) / 3 == pytest.approx(m["ce-loss"], abs=1e-3)  # each step's cross-entropy, 3 decimals


def test_bf16_precision_trains_under_autocast_and_fp32_does_not():
    """The dtype the attention's projections compute in during a step: bf16 under precision=bf16
    (torch.autocast), fp32 otherwise."""
    seen = {}
    for precision in ("bf16", "fp32"):
        model = build_model(ARGS, VOCAB, owned=[0, 1], seed=0)
        cfg = TrainConfig(precision=precision, warmup_steps=0)
        q = next(m for n, m in model.named_modules() if n.endswith("self_attn.q_proj"))
        q.register_forward_hook(lambda _m, _i, out, p=precision: None if p in seen else seen.update({p: out.dtype}))
        block = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
        train_steps(model, make_optimizer(model, cfg), iter([block]), cfg, 0, 1, 1, torch.device("cpu"))
    assert seen == {"bf16": torch.bfloat16, "fp32": torch.float32}
