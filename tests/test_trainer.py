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
