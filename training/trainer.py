"""The local training loop of one node (plain torch: no Flower, reused by the benchmarks)."""

from __future__ import annotations

import contextlib
import importlib
import math
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from common.train_config import TrainConfig
from model.balance import owned_experts
from model.experts import expert_modules, set_frozen_dtype
from model.loss import lm_loss
from training import parallel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # pragma: no mutate (CUDA only)
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible on this node")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at total_steps (by global step)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over the trainable parameters only: frozen experts get no optimizer state."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw8bit":
        return _adamw8bit(groups, cfg, next(iter(decay + no_decay)).device)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def _adamw8bit(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """torchao's AdamW8bit, else bitsandbytes'; both keep the moments in 8 bits (blockwise scales)."""
    if device.type != "cuda":  # pragma: no mutate (its CUDA side runs only in scripts/gpu_check.sh)
        raise ValueError(f"train.optimizer=adamw8bit needs the model on a CUDA device, it is on {device.type}")
    # The rest needs CUDA and torchao: scripts/gpu_check.sh trains with it on a GPU, the CPU suite
    # cannot, so mutation testing leaves it out (docs/testing.md).
    # pragma: no mutate block
    cls = None
    for module, name in (
        ("torchao.optim", "AdamW8bit"),
        ("torchao.prototype.low_bit_optim", "AdamW8bit"),
        ("bitsandbytes.optim", "AdamW8bit"),
    ):
        with contextlib.suppress(ImportError, AttributeError):
            cls = getattr(importlib.import_module(module), name)
            break
    if cls is None:
        raise ImportError("train.optimizer=adamw8bit needs torchao or bitsandbytes: pip install 'spes-flower[gpu]'")
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether the decoder layers recompute their activations in the backward."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Apply the node-side memory/speed options of `cfg` to `model` in place (idempotent).

    precision=bf16 stores the frozen experts in bf16: autocast would round them to bf16 for
    every matmul anyway, so training is unchanged while their memory halves. The owned experts
    and shared weights stay fp32 (what the node trains and sends).
    """
    if cfg.precision == "bf16" and expert_modules(model):
        set_frozen_dtype(model, torch.bfloat16)
    if cfg.activation_checkpointing and not activation_checkpointing(model):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        # Regional compilation: the decoder layers share one compiled graph, and the loss
        # (plain or lean) stays outside it.
        for layer in model.model.layers:
            if getattr(layer, "_compiled_call_impl", None) is None:
                layer.compile()
    return model


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window, so a node reports its own round's peak.

    Several simulated nodes can share one Ray worker process, whose lifetime peak would
    otherwise be reported by every node after the largest one. On Linux, writing 5 to
    clear_refs resets VmHWM to the current RSS; where that is not allowed, the lifetime
    peak (ru_maxrss) is what gets reported.
    """
    if device.type == "cuda":  # pragma: no mutate (CUDA only)
        torch.cuda.reset_peak_memory_stats(device)  # pragma: no mutate (CUDA only)
        return
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def process_memory_mb(field: str) -> float | None:
    """A field of /proc/self/status in MiB (VmRSS: resident now, VmHWM: peak); None where absent."""
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU (MiB)."""
    if device.type == "cuda":  # pragma: no mutate (CUDA only)
        return torch.cuda.max_memory_allocated(device) / 2**20  # pragma: no mutate (CUDA only)
    peak = process_memory_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NonFiniteTraining(RuntimeError):
    """A loss or gradient went NaN or Inf: nothing of this step reaches the weights or the moments,
    the round ends with an error and its state is not saved, so the node's next round starts from
    the coordinator's full model."""


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    start_step: int,
    steps: int,
    total_steps: int,
    device: torch.device,
    progress: Any = None,
    global_load: torch.Tensor | None = None,
    ranks: parallel.Ranks | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run `steps` optimizer steps; returns mean losses, tokens, throughput, peak memory, expert load.

    `after_step(n)` is called after the n-th update of this call (streaming fragments' overlap
    replaces parameter values there).

    `global_load` ([layers, experts]): the federation's expert load last round, for the
    balancing loss when cfg.balance_global_weight > 0. `ranks`: this process trains its share of
    every batch of a node spread over several ranks (training/parallel.py); the losses, load and
    token counts returned are the whole batch's.
    """
    prepare_model(model, cfg)
    model.train()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {"train-loss": 0.0, "ce-loss": 0.0, "aux-loss": 0.0, "z-loss": 0.0}
    tokens = 0
    load = None
    decay = cfg.local_decay()
    owned = owned_experts(model) if decay is not None else None
    reset_peak_memory(device)
    t0 = time.perf_counter()
    for i in range(steps):
        lr = lr_at(start_step + i, cfg, total_steps)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # torchao's AdamW8bit keeps lr as a tensor
                group["lr"].fill_(lr)  # pragma: no mutate (CUDA only: the 8-bit optimizer)
            else:
                group["lr"] = lr
        block = next(batches)
        tokens += block.shape[0] * (block.shape[1] - 1)
        block = (block if ranks is None else ranks.part(block)).to(device, non_blocking=True)
        with autocast:
            parts = lm_loss(
                model,
                block,
                cfg.aux_loss_weight,
                cfg.z_loss_weight,
                balance=cfg.balance,
                logit_z_weight=cfg.logit_z_loss_weight,
                local_decay=decay,
                owned=owned,
                step=start_step + i,
                total_steps=total_steps,
                lean=cfg.lean_loss,
                global_load=global_load,
                global_weight=cfg.balance_global_weight,
                reduce=None if ranks is None else parallel.sum_over_ranks,
            )
        values = [float(v.detach()) for v in (parts.total, parts.ce, parts.aux, parts.z)]
        if ranks is not None:  # every rank decides alike, on the whole batch's loss
            values = [parallel.mean_over_ranks(v) for v in values]
        if not math.isfinite(loss := values[0]):
            raise NonFiniteTraining(f"step {start_step + i}: the loss is {loss}; the round stops before the update")
        parts.total.backward()
        norm = parallel.full(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        if not math.isfinite(float(norm)):
            raise NonFiniteTraining(
                f"step {start_step + i}: the gradient norm is {float(norm)}; the round stops before the update"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(i + 1)
        for key, value in zip(sums, values):
            sums[key] += value
        if parts.expert_counts is not None:
            load = parts.expert_counts if load is None else load + parts.expert_counts
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(parts.ce.detach()):.3f}", lr=f"{lr:.2e}")
    if device.type == "cuda":  # pragma: no mutate (CUDA only)
        torch.cuda.synchronize(device)  # pragma: no mutate (CUDA only)
    seconds = time.perf_counter() - t0
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out.update(
        {
            "num-tokens": float(tokens),
            "train-seconds": seconds,
            "tokens-per-s": tokens / seconds if seconds > 0 else 0.0,
            "peak-mem-mb": peak_memory_mb(device),
        }
    )
    if load is not None:
        # Fraction of each layer's routed tokens per expert, flattened [layers * experts].
        out["expert-load"] = (load / load.sum(dim=1, keepdim=True).clamp_min(1)).flatten().tolist()
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, max_batches: int, device: torch.device
) -> tuple[float, int]:
    """Mean next-token cross-entropy over the first max_batches batches of `blocks`."""
    model.eval()
    total, tokens = 0.0, 0
    for b in range(min(max_batches, math.ceil(len(blocks) / batch_size))):
        block = blocks[b * batch_size : (b + 1) * batch_size].to(device)
        n = block.shape[0] * (block.shape[1] - 1)
        total += float(lm_loss(model, block, 0.0, 0.0).ce) * n
        tokens += n
    if tokens == 0:
        raise ValueError("no held-out data to evaluate on")
    return total / tokens, tokens
