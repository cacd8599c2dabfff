"""Per-expert modules so that a node can freeze the experts it does not own.

transformers stores a layer's experts fused ([E, 2I, H] and [E, H, I]); `requires_grad` is per
tensor, so a fused tensor cannot be half frozen and a gradient mask saves no memory (the
gradient and both AdamW moments still exist for every expert). Each expert therefore becomes a
module of its own: owned experts have trainable weights, the others are frozen and carry no
gradient or optimizer state. The module names match the per-expert keys that `save_pretrained`
writes (`...mlp.experts.<e>.{gate,up,down}_proj.weight`), so export stays standard.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN


class ExpertFFN(nn.Module):
    """One SwiGLU expert."""

    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PartitionedExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts module (same forward signature)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        for e in range(num_experts):
            self.add_module(str(e), ExpertFFN(hidden, inter, act))

    def __getitem__(self, e: int) -> ExpertFFN:
        return getattr(self, str(e))

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "PartitionedExperts":
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        num_experts, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        act = getattr(fused, "config_act", None) or "silu"
        # Build without initialising (every weight is copied below) and on the fused tensor's
        # device, so a meta-device model of billions of parameters costs nothing.
        with torch.device("meta"):
            new = cls(num_experts, hidden, inter, act)
        new = new.to_empty(device=gate_up.device).to(dtype=gate_up.dtype)
        if gate_up.device.type == "meta":
            return new
        with torch.no_grad():
            for e in range(num_experts):
                # Fused layout is gate rows first, then up rows.
                new[e].gate_proj.weight.copy_(gate_up[e, :inter])
                new[e].up_proj.weight.copy_(gate_up[e, inter:])
                new[e].down_proj.weight.copy_(down[e])
        return new

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E, tokens, top_k] membership; one pass decides which experts were hit at all.
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 0, 1)
            hit = mask.sum(dim=(1, 2)).nonzero().flatten().tolist()
        for e in hit:
            token_idx, k_pos = torch.where(mask[e])
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _moe_blocks(model: nn.Module) -> Iterable[nn.Module]:
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "gate"):
            yield module


def partition_experts(model: nn.Module, owned: Iterable[int] | None = None) -> nn.Module:
    """Replace every fused experts module of `model` in place; `owned=None` trains all experts."""
    act = getattr(model.config, "hidden_act", "silu")
    for block in _moe_blocks(model):
        if isinstance(block.experts, PartitionedExperts):
            continue
        fused = block.experts
        fused.config_act = act
        block.experts = PartitionedExperts.from_fused(fused)
        del fused
    set_owned_experts(model, owned)
    return model


def set_owned_experts(model: nn.Module, owned: Iterable[int] | None) -> None:
    """Make exactly the `owned` experts trainable in every layer (None: all of them)."""
    blocks = list(_moe_blocks(model))
    if not blocks or not isinstance(blocks[0].experts, PartitionedExperts):
        raise TypeError("call partition_experts(model) before set_owned_experts")
    num_experts = blocks[0].experts.num_experts
    owned_set = set(range(num_experts)) if owned is None else set(owned)
    bad = sorted(e for e in owned_set if not 0 <= e < num_experts)
    if bad:
        raise ValueError(f"owned experts {bad} out of range [0, {num_experts})")
    for block in blocks:
        for e in range(num_experts):
            trainable = e in owned_set
            for p in block.experts[e].parameters():
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None
