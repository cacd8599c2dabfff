"""LoRA on the shared backbone (peft): low-rank adapters on the attention projections.

With LoRA, a node trains (and sends) adapters instead of the full attention matrices: the
frozen base projections carry no gradient or AdamW state. Its owned experts stay fully
trainable (they are the node's own share of the model), and so do the routers and norms
(tiny, and the router must keep learning to balance). Embeddings and LM head are frozen.

The global model holds the base weights plus the adapters under plain names (model/naming.py);
`merge_adapters` folds them into plain base weights (W + alpha/r * B @ A), which is what the
coordinator evaluates and exports. peft is imported only where a model is wrapped, so a run
without LoRA (and the config checks) never loads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.balance import owned_experts
from model.experts import set_owned_experts
from model.export import save_hf_atomic
from model.naming import (
    _PLAIN_ADAPTER,
    ATTENTION_PROJECTIONS,
    LORA_ALWAYS_TRAINED,
    is_adapter_name,
    parse_expert_param,
)

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "ATTENTION_PROJECTIONS",
    "LoraArgs",
    "lora_args",
    "parse_targets",
    "apply_lora",
    "adapter_param_names",
    "init_adapters",
    "adapter_shapes",
    "split_adapters",
    "merge_adapters",
    "merge_and_export",
]


def parse_targets(targets: str) -> list[str]:
    """`"q_proj, v_proj"` -> ["q_proj", "v_proj"] (the config's comma-separated form)."""
    return [t.strip() for t in str(targets).split(",") if t.strip()]


@dataclass
class LoraArgs:
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank  # peft's default (not rsLoRA)

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        bad = sorted(set(self.targets) - set(ATTENTION_PROJECTIONS))
        if not self.targets or bad:
            raise ValueError(
                f"lora targets must be a non-empty subset of {list(ATTENTION_PROJECTIONS)}, got {bad or []}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


def lora_args(train_cfg) -> LoraArgs | None:
    """The LoRA settings of a TrainConfig, or None when train.lora_rank is 0 (full shared training)."""
    if not train_cfg.lora_rank:
        return None
    return LoraArgs(train_cfg.lora_rank, float(train_cfg.lora_alpha), parse_targets(train_cfg.lora_targets))


def apply_lora(model: torch.nn.Module, args: LoraArgs, owned: Iterable[int] | None = None) -> PeftModel:
    """Wrap a partitioned MoE: adapters + owned experts + routers + norms trainable, the rest frozen.

    owned=None keeps the experts the model already trains. The wrapped modules are changed in
    place: `get_base_model()` is the same Hugging Face model, now with the adapters in its forward.
    """
    from peft import LoraConfig, get_peft_model

    args.validate()
    if owned is None:
        owned = owned_experts(model)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=list(args.targets), lora_dropout=args.dropout, bias="none"
    )
    peft_model = get_peft_model(model, config)  # freezes every base parameter
    set_owned_experts(peft_model.base_model.model, owned)
    for name, p in peft_model.named_parameters():
        if parse_expert_param(name) is None and name.endswith(LORA_ALWAYS_TRAINED):
            p.requires_grad_(True)
    return peft_model


def adapter_param_names(model: torch.nn.Module) -> list[str]:
    """The LoRA parameters (what replaces the attention matrices in a node's upload)."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def _targeted_linears(model: torch.nn.Module, targets: Iterable[str]) -> dict[str, torch.nn.Linear]:
    wanted = set(targets)
    found = {
        n: m for n, m in model.named_modules() if n.rpartition(".")[2] in wanted and isinstance(m, torch.nn.Linear)
    }
    if not found:
        raise ValueError(f"the model has no linear layer named any of {sorted(wanted)}")
    return found


def init_adapters(model: torch.nn.Module, args: LoraArgs, seed: int) -> dict[str, torch.Tensor]:
    """Fresh adapters for every targeted projection of a plain model, under plain names.

    peft's default init (init_lora_weights=True): A kaiming-uniform with a=sqrt(5) (bound
    1/sqrt(in_features)), B zeros, so the adapted model starts equal to the base model.
    """
    args.validate()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, linear in _targeted_linears(model, args.targets).items():
        bound = 1.0 / math.sqrt(linear.in_features)
        a = torch.rand(args.rank, linear.in_features, generator=gen, dtype=torch.float32) * (2 * bound) - bound
        out[f"{name}.lora_A.weight"] = a.to(linear.weight.dtype)
        out[f"{name}.lora_B.weight"] = torch.zeros(linear.out_features, args.rank, dtype=linear.weight.dtype)
    return out


def adapter_shapes(model: torch.nn.Module, args: LoraArgs) -> dict[str, tuple[int, ...]]:
    """Plain adapter name -> shape for a plain model (what a checkpoint of this run must hold)."""
    out = {}
    for name, linear in _targeted_linears(model, args.targets).items():
        out[f"{name}.lora_A.weight"] = (args.rank, linear.in_features)
        out[f"{name}.lora_B.weight"] = (linear.out_features, args.rank)
    return out


def split_adapters(
    params: Mapping[str, torch.Tensor], args: LoraArgs | None, model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, adapters) of a global model; ValueError unless the adapters are exactly the
    ones `args` makes for `model` (args=None: none), e.g. a checkpoint resumed with other LoRA settings."""
    adapters = {n: t for n, t in params.items() if is_adapter_name(n)}
    want = {} if args is None else adapter_shapes(model, args)
    if {n: tuple(t.shape) for n, t in adapters.items()} != want:
        raise ValueError(
            f"{len(adapters)} LoRA adapter tensors, but train.lora_rank={0 if args is None else args.rank} and "
            f"train.lora_targets make {len(want)}" + (" of other names or shapes" if want and adapters else "")
        )
    return {n: t for n, t in params.items() if n not in adapters}, adapters


def merge_adapters(params: Mapping[str, torch.Tensor], args: LoraArgs) -> dict[str, torch.Tensor]:
    """Plain base weights with the adapters folded in: W + (alpha / r) * B @ A per adapted module.

    Every targeted projection needs an adapter, every adapter both halves and its base weight;
    the result holds no adapter names.
    """
    merged = {n: t for n, t in params.items() if not is_adapter_name(n)}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in params.items():
        m = _PLAIN_ADAPTER.match(n)
        if m is not None:
            modules.setdefault(m["module"], {})[m["part"]] = t
    targets = set(args.targets)
    bare = [
        n
        for n in merged
        if n.endswith(".weight")
        and n[: -len(".weight")].rpartition(".")[2] in targets
        and n[: -len(".weight")] not in modules
    ]
    if bare:
        raise KeyError(f"{len(bare)} targeted projection(s) without an adapter, e.g. {bare[:3]}")
    for module, parts in modules.items():
        base = f"{module}.weight"
        if set(parts) != {"lora_A", "lora_B"} or base not in merged:
            raise KeyError(
                f"adapter of {module} incomplete: has {sorted(parts)}, base weight present: {base in merged}"
            )
        a, b, w = parts["lora_A"], parts["lora_B"], merged[base]
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"adapter of {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit W {tuple(w.shape)}"
            )
        delta = (b.double() @ a.double()) * args.scaling
        merged[base] = (w.double() + delta).to(w.dtype)
    return merged


def merge_and_export(peft_model: PeftModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Fold the adapters into the base weights and save a plain checkpoint (no peft needed to load).

    The merge changes the wrapped model in place: export a copy if training continues.
    """
    merged = peft_model.merge_and_unload()
    return save_hf_atomic(merged, out_dir, tokenizer)
