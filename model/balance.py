"""Router load-balancing losses (Switch-Transformer style: E * sum_i f_i * P_i).

f_i is the share of the top-k picks that went to expert i (not differentiable), P_i the mean
router probability of expert i (differentiable). Two ways to combine the layers:

- per_layer (the reference's definition): the loss of every layer on its own, averaged over
  layers, with f_i = picks_i / (tokens * k). 1.0 when a layer is perfectly balanced, up to E/k
  when it collapses. Each layer must balance on its own.
- pooled (transformers' `load_balancing_loss_func`): f and P are pooled over all layers first,
  f_i = picks_i / tokens (sums to k), so balanced gives k. Layers that collapse on *different*
  experts look balanced when pooled; the penalty depends on which index each layer collapsed on.

The decayed variant (docs/method.md section 4) scales the node's own experts' counts by a factor
rising from `start` to 1 over the first `warmup_fraction` of training, so routing to experts the
node can train is penalised less early on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from model.naming import parse_expert_param

BALANCE_MODES = ("per_layer", "pooled")


@dataclass(frozen=True)
class LocalDecay:
    start: float = 0.7  # factor on the node's own experts' counts at step 0
    warmup_fraction: float = 0.2  # of total_steps, over which the factor rises linearly to 1
    every: int = 500  # the factor changes only at multiples of this many global steps

    def factor(self, step: int, total_steps: int) -> float:
        ramp = self.warmup_fraction * total_steps
        if ramp <= 0:
            return 1.0
        held = (step // self.every) * self.every
        return self.start + (1.0 - self.start) * min(held / ramp, 1.0)

    def validate(self) -> None:
        if not 0 < self.start <= 1:
            raise ValueError(f"train.balance_local_start must be in (0, 1], got {self.start}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"train.balance_local_warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.every < 1:
            raise ValueError(f"train.balance_local_every must be >= 1, got {self.every}")


def count_scale(
    num_experts: int, owned: Iterable[int], factor: float, device: torch.device | None = None
) -> torch.Tensor:
    """[E] multipliers for the experts' counts: `factor` on the owned ones, 1 elsewhere.

    A node owning every expert (DiLoCo/FedAvg) has nothing to steer toward: all ones.
    """
    scale = torch.ones(num_experts, device=device)
    idx = sorted(set(owned))
    if idx and len(idx) < num_experts:
        scale[idx] = factor
    return scale


def _layer_stats(
    logits: torch.Tensor, num_experts: int, top_k: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k pick counts per expert (no gradient) and summed router probabilities per expert."""
    probs = torch.softmax(logits.float(), dim=-1)
    choice = probs if bias is None else probs.detach() + bias.to(probs.device)
    picks = choice.topk(top_k, dim=-1).indices.reshape(-1)
    # scatter_add instead of bincount: no device-to-host sync on GPU.
    counts = torch.zeros(num_experts, device=logits.device).scatter_add_(
        0, picks, torch.ones_like(picks, dtype=torch.float32)
    )
    return counts, probs.sum(dim=0)


def balance_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    mode: str = "per_layer",
    scale: torch.Tensor | None = None,
    global_load: torch.Tensor | None = None,
    global_weight: float = 0.0,
    bias: Sequence[torch.Tensor | None] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Load-balancing loss over a model's layers; `router_logits[l]` is [tokens, experts].

    `scale` ([E]) multiplies each expert's pick counts (the decayed variant); None = ones.
    per_layer only: `global_load` ([L, E], each row sums to 1) is the federation's load share
    of each expert last round, mixed into f_i with `global_weight` (model/routing.py).
    `bias[l]` ([E] or None): the routing bias the picks were made with.
    `reduce`: the sum over the ranks that split one batch (training/parallel.py), differentiable;
    f and P are then the whole batch's, so the loss is the one a single rank would compute.
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"train.balance must be one of {list(BALANCE_MODES)}, got {mode!r}")
    bias = list(bias) if bias is not None else [None] * len(router_logits)
    stats = [_layer_stats(r, num_experts, top_k, b) for r, b in zip(router_logits, bias)]
    tokens: list = [r.shape[0] for r in router_logits]
    if reduce is not None:
        stats = [(reduce(c), reduce(p)) for c, p in stats]
        tokens = [c.sum() / top_k for c, _ in stats]  # every token makes exactly top_k picks
    if scale is not None:
        stats = [(c * scale.to(c.device), p) for c, p in stats]
    if mode == "per_layer":
        per_layer = []
        for layer, ((c, p), n) in enumerate(zip(stats, tokens)):
            f = c / (n * top_k)
            if global_load is not None and global_weight > 0:
                f = (1 - global_weight) * f + global_weight * global_load[layer].to(f)
            per_layer.append(num_experts * torch.sum(f * (p / n)))
        return torch.stack(per_layer).mean()
    if global_weight > 0:  # refused whether or not a load has arrived yet (round 1 has none)
        raise ValueError("train.balance_global_weight needs train.balance=per_layer")
    rows = sum(tokens)
    counts = torch.stack([c for c, _ in stats]).sum(dim=0)
    probs = torch.stack([p for _, p in stats]).sum(dim=0)
    return num_experts * torch.sum(counts / rows * (probs / rows))


def owned_experts(model: torch.nn.Module) -> list[int]:
    """Expert indices this model trains (any of their parameters requires grad)."""
    return sorted({p.expert for n, t in model.named_parameters() if t.requires_grad and (p := parse_expert_param(n))})


def logit_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the output logits (PaLM's z-loss), keeps the softmax normaliser near 1."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
