"""Training loss: next-token cross-entropy + router load-balancing loss + router z-loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    # [layers, experts] tokens routed to each expert (top-k picks), or None without router logits.
    expert_counts: torch.Tensor | None = None


@torch.no_grad()
def expert_counts(router_logits: tuple[torch.Tensor, ...], top_k: int, num_experts: int) -> torch.Tensor:
    picks = [r.topk(top_k, dim=-1).indices.flatten() for r in router_logits]
    return torch.stack([torch.bincount(p, minlength=num_experts) for p in picks]).float()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE), averaged over layers."""
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()


def lm_loss(model: torch.nn.Module, block: torch.Tensor, aux_weight: float, z_weight: float) -> LossParts:
    """`block` is [batch, seq_len + 1]; inputs are block[:, :-1], targets block[:, 1:]."""
    inputs, targets = block[:, :-1], block[:, 1:]
    want_router = aux_weight > 0 or z_weight > 0
    out = model(input_ids=inputs, output_router_logits=want_router, use_cache=False)
    logits = out.logits
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    zero = ce.new_zeros(())
    aux, z, counts = zero, zero, None
    if want_router:
        cfg = model.config
        aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        z = router_z_loss(out.router_logits)
        counts = expert_counts(out.router_logits, cfg.num_experts_per_tok, cfg.num_experts)
    return LossParts(total=ce + aux_weight * aux + z_weight * z, ce=ce, aux=aux, z=z, expert_counts=counts)
