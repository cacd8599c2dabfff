"""Training loss: next-token cross-entropy + router load-balancing loss + router z-loss (+ output-logit z-loss)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from model.balance import LocalDecay, balance_loss, count_scale
from model.ce import forward_ce
from model.routing import choice_offsets


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    # [layers, experts] tokens routed to each expert (top-k picks), or None without router logits.
    expert_counts: torch.Tensor | None = None
    logit_z: torch.Tensor | None = None


@torch.no_grad()
def expert_counts(
    router_logits: tuple[torch.Tensor, ...], top_k: int, num_experts: int, bias: list | None = None
) -> torch.Tensor:
    """[layers, experts] top-k picks, made as the router made them (with its selection bias, if any)."""
    bias = bias or [None] * len(router_logits)
    picks = [
        (
            r.topk(top_k, dim=-1)
            if b is None
            else (torch.softmax(r.float(), dim=-1) + b.to(r.device)).topk(top_k, dim=-1)
        ).indices.flatten()
        for r, b in zip(router_logits, bias)
    ]
    return torch.stack([torch.bincount(p, minlength=num_experts) for p in picks]).float()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE), averaged over layers."""
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()


def lm_loss(
    model: torch.nn.Module,
    block: torch.Tensor,
    aux_weight: float,
    z_weight: float,
    *,
    balance: str = "per_layer",
    logit_z_weight: float = 0.0,
    local_decay: LocalDecay | None = None,
    owned: Iterable[int] | None = None,
    step: int = 0,
    total_steps: int = 1,
    lean: bool = False,
    global_load: torch.Tensor | None = None,
    global_weight: float = 0.0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LossParts:
    """`block` is [batch, seq_len + 1]; inputs are block[:, :-1], targets block[:, 1:].

    balance: per_layer | pooled (model/balance.py). local_decay (with the node's `owned` experts
    and the global `step` of `total_steps`) scales the owned experts' counts in the balancing loss.
    global_load/global_weight: the federation's load per layer mixed into the balancing loss.
    reduce: sums over the ranks that share the batch (model/balance.py); the counts returned are
    then the whole batch's. The other terms are means over tokens, and the ranks' shares are equal.
    """
    inputs, targets = block[:, :-1], block[:, 1:]
    want_router = aux_weight > 0 or z_weight > 0
    # lean: CE (and logit z-loss) from the last hidden state, a chunk of tokens at a time (model/ce.py).
    out, ce, lz = forward_ce(model, inputs, targets, want_router, lean=lean, logit_z=logit_z_weight > 0)
    zero = ce.new_zeros(())
    aux, z, counts = zero, zero, None
    if want_router:
        cfg = model.config
        scale = None
        if local_decay is not None and owned is not None:
            factor = local_decay.factor(step, total_steps)
            scale = count_scale(cfg.num_experts, owned, factor, device=ce.device)
        bias = choice_offsets(model)
        aux = balance_loss(
            out.router_logits,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            balance,
            scale,
            global_load,
            global_weight,
            bias,
            reduce,
        )
        z = router_z_loss(out.router_logits)
        counts = expert_counts(out.router_logits, cfg.num_experts_per_tok, cfg.num_experts, bias)
        if reduce is not None:
            counts = reduce(counts)
    total = ce + aux_weight * aux + z_weight * z
    if lz is not None:
        total = total + logit_z_weight * lz
    return LossParts(total=total, ce=ce, aux=aux, z=z, expert_counts=counts, logit_z=lz)
