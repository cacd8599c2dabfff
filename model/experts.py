"""Experts that a node can half freeze: per-expert parameters laid out as two blocks per layer.

transformers stores a layer's experts fused ([E, 2I, H] and [E, H, I]); `requires_grad` is per
tensor, so a fused tensor cannot be half frozen and a gradient mask saves no memory (the
gradient and both AdamW moments still exist for every expert). Each expert therefore keeps
parameters of its own, named like the per-expert keys that `save_pretrained` writes
(`...mlp.experts.<e>.{gate,up,down}_proj.weight`), so state dicts, export, the codec and the
strategy see standard names.

Those parameters are views into two contiguous blocks per layer, the owned experts' and the
frozen experts' (in that order of expert ids: the block order is a permutation of the experts,
so any owned set works). The forward runs one grouped GEMM per block and projection instead of
a Python loop over experts; the owned block carries gradients to the per-expert parameters
without a copy, the frozen block carries none and may be stored in bf16 (the coordinator keeps
the fp32 masters; loading fp32 into it casts). The per-expert loop stays available
(`implementation="loop"`, the reference in tests); grouped was not slower on CPU either (tiny
preset, 8 x 128, 1 thread, scripts/cpu_expert_timing.py, 2026-11-28: 3223 vs 2804 and 3035 vs 2921 tokens
per CPU-second against the previous per-expert module, two runs on a loaded 2-core machine).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

IMPLEMENTATIONS = ("auto", "loop", "grouped")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's grouped GEMM takes
_KEEP = object()  # set_owned_experts(frozen_dtype=_KEEP): leave the frozen storage dtype as it is


class ExpertFFN(nn.Module):
    """One SwiGLU expert."""

    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate_proj.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)  # bf16 frozen storage without autocast
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _OwnedBlock(torch.autograd.Function):
    """The owned block as one tensor per projection whose gradient lands in the per-expert
    parameters it is a view of (no stacking copy in the forward, no split copy of weights)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, down: torch.Tensor, *params: torch.Tensor):
        ctx.experts, ctx.inter = gate_up.shape[0], down.shape[2]
        return gate_up.view_as(gate_up), down.view_as(down)

    @staticmethod
    def backward(ctx, g_gate_up: torch.Tensor, g_down: torch.Tensor):
        inter, grads = ctx.inter, []
        for i in range(ctx.experts):
            grads += [g_gate_up[i, :inter], g_gate_up[i, inter:], g_down[i]]
        return (None, None, *grads)


def _has_grouped_mm(device: torch.device) -> bool:
    # torch.nn.functional.grouped_mm (2.10+) runs on CPU too; the older private op was CUDA-only.
    return hasattr(F, "grouped_mm") or (device.type == "cuda" and hasattr(torch, "_grouped_mm"))


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, K] sorted by group, weight [G, N, K] (row-major, like nn.Linear) -> [S, N]."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)


class PartitionedExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts module (same forward signature)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        for e in range(num_experts):
            self.add_module(str(e), ExpertFFN(hidden, inter, act))
        self.act_fn = ACT2FN[act]
        # auto: grouped GEMM where torch has it for the dtype, else the per-expert loop.
        self.implementation = "auto"
        self.owned: tuple[int, ...] = tuple(range(num_experts))
        self.absent: tuple[int, ...] = ()  # experts this node does not hold (partial residency)
        self.frozen_dtype: torch.dtype | None = None  # None: frozen experts keep the owned dtype
        self.master_dtype = self[0].gate_proj.weight.dtype
        self._blocks: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._ptrs: tuple[int, ...] = ()
        self._slot = torch.empty(0)
        self._copy_on_pack = True  # False while materialising garbage (materialize_empty)
        # True once FSDP owns the parameters (training/parallel.py): they are replaced by gathered
        # tensors around every forward, so the blocks are stacked from them per call, never packed.
        self.sharded = False
        self._pack()

    def __getitem__(self, e: int) -> ExpertFFN:
        return getattr(self, str(e))

    @property
    def frozen(self) -> tuple[int, ...]:
        skip = set(self.owned) | set(self.absent)
        return tuple(e for e in range(self.num_experts) if e not in skip)

    @property
    def resident(self) -> tuple[int, ...]:
        gone = set(self.absent)
        return tuple(e for e in range(self.num_experts) if e not in gone)

    def _params(self) -> list[torch.Tensor]:
        return [p for e in self.resident for p in self[e].parameters()]

    def set_absent(self, absent: Iterable[int]) -> None:
        """Hold no parameters for the `absent` experts (never an owned one): their modules go, so no
        state dict, optimizer or block holds them; one that comes back gets fresh storage, in the
        frozen block's dtype and device, for the caller to load."""
        absent = tuple(sorted(set(absent)))
        if bad := [e for e in absent if not 0 <= e < self.num_experts or e in self.owned]:
            raise ValueError(f"experts {bad} cannot be absent: out of range or owned ({self.owned})")
        if self.sharded and absent:
            raise RuntimeError("the experts are sharded (FSDP): every expert stays resident")
        if absent == self.absent:
            return
        ref = self[self.resident[0]].gate_proj.weight
        for e in set(self.absent) - set(absent):  # returning: fresh storage, loaded by the caller
            with torch.device(ref.device):
                expert = ExpertFFN(self.hidden, self.inter, "silu")
            expert.act_fn = self.act_fn
            self.add_module(str(e), expert.to(self.frozen_dtype or self.master_dtype).requires_grad_(False))
        for e in absent:  # gone from the module tree: a full state dict's copy is an unexpected key
            self._modules.pop(str(e), None)
        self.absent = absent
        self._pack()

    @torch.no_grad()
    def _pack(self) -> None:
        """Lay the experts out as [owned block, frozen block] and make the parameters views of it."""
        for group, experts in (("owned", self.owned), ("frozen", self.frozen)):
            if not experts:
                self._blocks[group] = None
                continue
            dtype = self.master_dtype if group == "owned" else (self.frozen_dtype or self.master_dtype)
            device = self[experts[0]].gate_proj.weight.device
            n, inter, hidden = len(experts), self.inter, self.hidden
            gate_up = torch.empty(n, 2 * inter, hidden, dtype=dtype, device=device)
            down = torch.empty(n, hidden, inter, dtype=dtype, device=device)
            for i, e in enumerate(experts):
                ex = self[e]
                views = (gate_up[i, :inter], gate_up[i, inter:], down[i])
                for p, view in zip((ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight), views):
                    if device.type != "meta" and self._copy_on_pack:
                        view.copy_(p)
                    p.data = view
            self._blocks[group] = (gate_up, down)
        self._slot = self._block_slots(self[self.resident[0]].gate_proj.weight.device)
        self._ptrs = tuple(p.data_ptr() for p in self._params())

    def _block_slots(self, device: torch.device) -> torch.Tensor:
        """[E] each expert's position in block order (owned experts first); an absent expert's is
        the number of resident ones (sorted after every block)."""
        order = list(self.owned) + list(self.frozen)
        slot = torch.full((self.num_experts,), len(order), dtype=torch.long, device="cpu")
        slot[order] = torch.arange(len(order))
        return slot.to(device)

    def _stale(self) -> bool:
        """True when something replaced the parameters' storage (`.to()`, assign-loading, ...)."""
        return tuple(p.data_ptr() for p in self._params()) != self._ptrs

    def _apply(self, fn, recurse=True):
        # Module.to()/to_empty()/cuda() give every parameter storage of its own: re-pack, with
        # the dtypes the conversion produced.
        out = super()._apply(fn, recurse)
        if self.sharded:  # FSDP owns the storage; only the slot table is ours
            self._slot = self._block_slots(self._slot.device if self._slot.device.type != "meta" else "cpu")
            return out
        if self.owned:
            self.master_dtype = self[self.owned[0]].gate_proj.weight.dtype
        if self.frozen:
            fdt = self[self.frozen[0]].gate_proj.weight.dtype
            self.frozen_dtype = None if fdt == self.master_dtype else fdt
        self._pack()
        return out

    def set_owned(self, owned: Iterable[int], frozen_dtype=_KEEP) -> None:
        owned = tuple(sorted(set(owned)))
        bad = [e for e in owned if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"owned experts {bad} out of range [0, {self.num_experts})")
        if absent_owned := sorted(set(owned) & set(self.absent)):
            raise ValueError(f"owned experts {absent_owned} are absent: make them resident first (set_absent)")
        new_dtype = self.frozen_dtype if frozen_dtype is _KEEP else frozen_dtype
        if new_dtype == self.master_dtype:
            new_dtype = None
        if self.sharded and (owned != self.owned or new_dtype != self.frozen_dtype):
            raise RuntimeError("the experts are sharded (FSDP): ownership and storage dtype are fixed at the build")
        if owned != self.owned or new_dtype != self.frozen_dtype:
            self.owned, self.frozen_dtype = owned, new_dtype
            self._pack()
        mine = set(owned)
        for e in self.resident:
            for p in self[e].parameters():
                p.requires_grad_(e in mine)
                if e not in mine:
                    p.grad = None

    @classmethod
    def from_fused(cls, fused: nn.Module, act: str = "silu") -> PartitionedExperts:
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        num_experts, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        # Build without initialising (every weight is copied below) and on the fused tensor's
        # device, so a meta-device model of billions of parameters costs nothing.
        with torch.device("meta"):
            new = cls(num_experts, hidden, inter, act)
        new = new.to_empty(device=gate_up.device).to(dtype=gate_up.dtype)  # re-packs on that device
        if gate_up.device.type == "meta":
            return new
        with torch.no_grad():
            for e in range(num_experts):
                # Fused layout is gate rows first, then up rows (the same as our blocks).
                new[e].gate_proj.weight.copy_(gate_up[e, :inter])
                new[e].up_proj.weight.copy_(gate_up[e, inter:])
                new[e].down_proj.weight.copy_(down[e])
        return new

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if not self.sharded and not torch.compiler.is_compiling() and self._stale():
            self._pack()
        if self.absent:
            top_k_weights = self._resident_weights(top_k_index, top_k_weights)
        impl = self.implementation
        if impl == "auto":
            impl = "grouped" if _has_grouped_mm(hidden_states.device) else "loop"
        if impl == "grouped" and hidden_states.dtype in _GROUPED_DTYPES:
            return self._forward_grouped(hidden_states, top_k_index, top_k_weights)
        return self._forward_loop(hidden_states, top_k_index, top_k_weights)

    def _resident_weights(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The routing weights with each absent pick's share dropped and the resident picks scaled
        back to the token's total (FoMoE's skip); 0 for a token whose every pick is absent."""
        gone = torch.zeros(self.num_experts, dtype=torch.bool, device=top_k_index.device)
        gone[list(self.absent)] = True
        kept = top_k_weights.masked_fill(gone[top_k_index], 0.0)
        share = kept.sum(dim=-1, keepdim=True)
        # A safe divisor, not torch.where over a division: no NaN even in the gradient.
        return kept * (top_k_weights.sum(dim=-1, keepdim=True) / torch.where(share > 0, share, 1.0))

    def _forward_loop(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E, tokens, top_k] membership; one pass decides which experts were hit at all.
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 0, 1)
            hit = mask.sum(dim=(1, 2)).nonzero().flatten().tolist()
        for e in (e for e in hit if e not in self.absent):
            token_idx, k_pos = torch.where(mask[e])
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def _forward_grouped(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        if tokens == 0:  # nothing routed here (the reshapes below cannot infer a size from 0 rows)
            return torch.zeros_like(hidden_states)
        slot = self._slot.to(top_k_index.device)[top_k_index.reshape(-1)]  # [S] position in block order
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=self.num_experts + 1)
        n_owned, n_resident = len(self.owned), self.num_experts - len(self.absent)
        # The one host sync per layer: where the owned rows end (and, with absent experts, the
        # resident ones: the absent picks sort last and compute nothing).
        split = int(counts[:n_owned].sum()) if n_owned else 0
        resident_rows = top_k_index.numel() - (int(counts[n_resident]) if self.absent else 0)
        x = hidden_states[order // top_k]
        autocast = torch.is_autocast_enabled(x.device.type)
        compute = torch.get_autocast_dtype(x.device.type) if autocast else None
        parts, total = [], x.shape[0]
        for group, lo, hi, group_counts in (
            ("owned", 0, split, counts[:n_owned]),
            ("frozen", split, resident_rows, counts[n_owned:n_resident]),
        ):
            if not (self.owned if group == "owned" else self.frozen):
                continue
            if hi == lo:  # no token routed to this block
                parts.append(x.new_empty(0, x.shape[1], dtype=compute or x.dtype))
                continue
            if self.sharded:
                gate_up, down = self._stacked(self.owned if group == "owned" else self.frozen)
            elif group == "owned" and torch.is_grad_enabled():
                gate_up, down = self._blocks[group]
                params = [p for e in self.owned for p in self[e].parameters()]
                if any(p.requires_grad for p in params):
                    gate_up, down = _OwnedBlock.apply(gate_up, down, *params)
            else:
                gate_up, down = self._blocks[group]
            dtype = compute or gate_up.dtype
            offsets = torch.cumsum(group_counts, 0, dtype=torch.int32)
            with torch.autocast(x.device.type, enabled=False):
                h = _grouped(x[lo:hi].to(dtype), gate_up.to(dtype), offsets)
                gate, up = h.chunk(2, dim=-1)
                parts.append(_grouped(self.act_fn(gate) * up, down.to(dtype), offsets).to(compute or x.dtype))
        if resident_rows < total:
            parts.append(x.new_zeros(total - resident_rows, x.shape[1], dtype=compute or x.dtype))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        # Routing weights are fp32: the weighted sum over the top-k picks runs in fp32.
        y = y * top_k_weights.reshape(-1)[order][:, None]
        unsorted = torch.empty_like(y)
        unsorted[order] = y
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _stacked(self, experts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, 2I, H] and [n, H, I] blocks stacked from the experts' current parameters (a copy that
        carries gradients back to them)."""
        gate_up = torch.stack([torch.cat([self[e].gate_proj.weight, self[e].up_proj.weight]) for e in experts])
        return gate_up, torch.stack([self[e].down_proj.weight for e in experts])


def _moe_blocks(model: nn.Module) -> Iterable[nn.Module]:
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "gate"):
            yield module


def materialize_empty(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device=device)` without the expert re-pack's copies of garbage (the
    caller loads every weight next)."""
    modules = expert_modules(model)
    for m in modules:
        m._copy_on_pack = False
    try:
        model.to_empty(device=device)
    finally:
        for m in modules:
            m._copy_on_pack = True


def expert_modules(model: nn.Module) -> list[PartitionedExperts]:
    return [b.experts for b in _moe_blocks(model) if isinstance(b.experts, PartitionedExperts)]


def partition_experts(
    model: nn.Module, owned: Iterable[int] | None = None, frozen_dtype: torch.dtype | None = None
) -> nn.Module:
    """Replace every fused experts module of `model` in place; `owned=None` trains all experts."""
    act = getattr(model.config, "hidden_act", "silu")
    for block in _moe_blocks(model):
        if isinstance(block.experts, PartitionedExperts):
            continue
        fused = block.experts
        block.experts = PartitionedExperts.from_fused(fused, act)
        del fused
    set_owned_experts(model, owned, frozen_dtype=frozen_dtype)
    return model


def set_owned_experts(model: nn.Module, owned: Iterable[int] | None, frozen_dtype=_KEEP) -> None:
    """Make exactly the `owned` experts trainable in every layer (None: all of them).

    `frozen_dtype` (e.g. torch.bfloat16) is the storage dtype of the other experts; None keeps
    them in the owned experts' dtype; omitted, it stays as it was. An expert that changes side
    is copied into the other block (cast if the dtypes differ).
    """
    modules = expert_modules(model)
    if not modules:
        raise TypeError("call partition_experts(model) before set_owned_experts")
    num_experts = modules[0].num_experts
    owned_set = set(range(num_experts)) if owned is None else set(owned)
    for m in modules:
        m.set_owned(owned_set, frozen_dtype)


ABSENT_POLICIES = ("skip", "mask")


def set_absent_experts(model: nn.Module, absent, policy: str = "skip") -> None:
    """Hold no weights of the `absent` experts (one list for every layer, or one per layer: partial
    residency). A token's pick of
    an absent expert is dropped and the resident picks carry the token's weight (`skip`, FoMoE's
    rule); `mask` also steers the router's top-k choice past them (model/routing.py). Either way
    the router's logits cover every expert, so the balancing and z-losses still do."""
    from model.routing import set_choice_mask

    if policy not in ABSENT_POLICIES:
        raise ValueError(f"absent-expert policy must be one of {ABSENT_POLICIES}, got {policy!r}")
    modules = expert_modules(model)
    layers = per_layer(absent, len(modules))
    for m, row in zip(modules, layers):
        m.set_absent(row)
    set_choice_mask(model, layers if policy == "mask" else None)


def per_layer(absent, num_layers: int) -> list[list[int]]:
    """`absent` as one sorted list per layer: given per layer already, or one list for every layer."""
    absent = list(absent)
    if absent and isinstance(absent[0], (list, tuple)):
        if len(absent) != num_layers:
            raise ValueError(f"absent experts given for {len(absent)} layers, the model has {num_layers}")
        return [sorted(set(row)) for row in absent]
    return [sorted(set(absent)) for _ in range(num_layers)]


def set_experts_implementation(model: nn.Module, implementation: str) -> None:
    """auto (grouped GEMM where available) | loop (one matmul per routed expert) | grouped."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"experts implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    for m in expert_modules(model):
        m.implementation = implementation


def set_frozen_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Store every layer's frozen experts in `dtype` (None: the owned experts' dtype); ownership unchanged."""
    modules = expert_modules(model)
    if not modules:
        raise TypeError("call partition_experts(model) before set_frozen_dtype")
    for m in modules:
        if not m.sharded:  # FSDP gathers one dtype per group: sharded frozen experts keep the owned dtype
            m.set_owned(m.owned, dtype)
