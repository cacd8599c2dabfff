"""Balancing experts across nodes: the federation's expert load, and a routing bias from it.

Every node sees only its own data, so a balancing loss computed on a node balances that node's
routing, not the federation's: with non-IID shards each node can look balanced while the same
experts are overloaded everywhere (or a node is pushed away from experts its data needs although
the federation is balanced). Two remedies use the load the coordinator aggregates from all nodes
(`global_load`, per layer the share of routed tokens each expert got last round):

- `train.balance_global_weight`: the balancing loss weighs each expert's router probability by
  a mix of the local and the global share (f_i in E * sum_i f_i * P_i, model/balance.py).
- `strategy.router_bias_rate`: an auxiliary-loss-free bias per expert (DeepSeek-V3, arXiv
  2412.19437 section 2.1.2) added to the router probabilities for the top-k *choice* only (the
  gate values stay the unbiased probabilities); after every round the coordinator moves each
  bias by `rate` toward balance: +rate for an expert below the mean load, -rate above it.

The bias lives on each router as a non-persistent buffer: state dicts, the codec and export do
not see it. Stock Qwen3-MoE has no router bias, so an exported checkpoint routes without it; the
coordinator writes it next to the export (`router_bias.json`) and reports the held-out loss both
with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_BIAS = "selection_bias"
_MASK = "absent_experts"  # partial residency, mask policy: experts the top-k choice passes over


def routers(model: nn.Module) -> list[nn.Module]:
    """The MoE routers in layer order (modules named `...mlp.gate` with an expert count)."""
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "num_experts")]


def _choice_offset(gate: nn.Module) -> torch.Tensor | None:
    """What the router adds to its probabilities for the top-k choice: the routing bias, and -inf
    for the experts the mask routes past (a masked expert is picked only when fewer than top_k are
    left); None where it chooses plainly."""
    bias, mask = getattr(gate, _BIAS, None), getattr(gate, _MASK, None)
    if mask is None:
        return bias
    base = torch.zeros(gate.num_experts, device=mask.device) if bias is None else bias.float()
    return base.masked_fill(mask, float("-inf"))


def _biased_choice(module: nn.Module, _inputs, output):
    offset = _choice_offset(module)
    if offset is None:
        return output
    logits, _, _ = output
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    indices = (probs + offset.to(probs.device)).topk(module.top_k, dim=-1).indices
    scores = probs.gather(-1, indices)
    if module.norm_topk_prob:
        scores = scores / scores.sum(dim=-1, keepdim=True)
    return logits, scores.to(logits.dtype), indices


def set_router_bias(model: nn.Module, bias: torch.Tensor | Sequence[Sequence[float]] | None) -> None:
    """Route with `bias` ([layers, experts]) added to the probabilities for the top-k choice; None removes it."""
    gates = routers(model)
    if bias is not None:
        bias = torch.as_tensor(bias, dtype=torch.float32)
        if bias.shape != (len(gates), gates[0].num_experts if gates else 0):
            raise ValueError(
                f"router bias has shape {tuple(bias.shape)}, the model has {len(gates)} routers "
                f"of {gates[0].num_experts if gates else 0} experts"
            )
        if not torch.isfinite(bias).all():
            raise ValueError("router bias holds NaN or Inf")
    for layer, gate in enumerate(gates):
        _set_choice_buffer(gate, _BIAS, None if bias is None else bias[layer].to(gate.weight.device))


def set_choice_mask(model: nn.Module, absent: Sequence[Sequence[int]] | None) -> None:
    """Route past each layer's `absent` experts in the top-k choice; the router's logits, and so the
    balancing and z-losses, still cover every expert. None (or no absent expert) removes the mask."""
    for layer, gate in enumerate(routers(model)):
        mask = None
        if absent and absent[layer]:
            mask = torch.zeros(gate.num_experts, dtype=torch.bool, device=gate.weight.device)
            mask[list(absent[layer])] = True
        _set_choice_buffer(gate, _MASK, mask)


def _set_choice_buffer(gate: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if not getattr(gate, "_spes_bias_hook", False):
        gate.register_forward_hook(_biased_choice)
        gate._spes_bias_hook = True
    if name in gate._buffers:
        gate._buffers[name] = value
    else:
        gate.register_buffer(name, value, persistent=False)


def router_bias(model: nn.Module) -> list[torch.Tensor | None]:
    """Each router's selection bias (None where it routes plainly)."""
    return [getattr(g, _BIAS, None) for g in routers(model)]


def choice_offsets(model: nn.Module) -> list[torch.Tensor | None]:
    """Each router's choice offset (`_choice_offset`), so the balancing loss and the expert load
    count the picks that were made."""
    return [_choice_offset(gate) for gate in routers(model)]


def global_load(reports: Sequence[tuple[Sequence[Sequence[float]], float]]) -> list[list[float]] | None:
    """Token-weighted mean of the nodes' per-layer load shares: `reports` = [(load[L][E], tokens)]."""
    reports = [(load, w) for load, w in reports if load and w > 0]
    if not reports:
        return None
    total = sum(w for _, w in reports)
    stacked = torch.stack([torch.tensor(load, dtype=torch.float64) * (w / total) for load, w in reports]).sum(dim=0)
    return stacked.tolist()


def imbalance(load: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(mean over layers, worst layer) of max/mean tokens per expert: 1.0 is perfectly balanced, E is collapse."""
    t = torch.tensor(load, dtype=torch.float64)
    per_layer = t.max(dim=1).values / t.mean(dim=1).clamp_min(1e-12)
    return float(per_layer.mean()), float(per_layer.max())


def update_bias(bias: Sequence[Sequence[float]], load: Sequence[Sequence[float]], rate: float) -> list[list[float]]:
    """One aux-loss-free step: bias + rate * sign(mean load - load), per layer and expert."""
    b = torch.tensor(bias, dtype=torch.float64)
    t = torch.tensor(load, dtype=torch.float64)
    return (b + rate * torch.sign(t.mean(dim=1, keepdim=True) - t)).tolist()


def unflatten(values, layers: int, experts: int, what: str) -> torch.Tensor | None:
    """[layers, experts] from a flat list received from the coordinator; None when absent; checked."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or len(values) != layers * experts:
        raise ValueError(f"{what} must be a list of {layers} x {experts} numbers")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{what} must hold numbers only")
    t = torch.tensor([float(v) for v in values], dtype=torch.float32).reshape(layers, experts)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or Inf")
    return t
