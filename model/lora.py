"""LoRA on the shared backbone (peft): low-rank adapters on the attention projections.

With LoRA, a node trains (and sends) adapters instead of the full attention matrices: the
frozen base projections carry no gradient or AdamW state. Its owned experts stay fully
trainable (they are the node's own share of the model), and so do the routers and norms
(tiny, and the router must keep learning to balance). Embeddings and LM head are frozen.
`merge_and_export` folds the adapters back into the weights and writes a plain Hugging Face
checkpoint that stock transformers loads without peft.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from model.balance import owned_experts
from model.experts import set_owned_experts
from model.export import save_hf_atomic
from model.naming import parse_expert_param

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ALWAYS_TRAINED = (".mlp.gate.weight", "norm.weight")  # routers, RMSNorms (incl. q/k-norm)


@dataclass
class LoraArgs:
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    dropout: float = 0.0

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        bad = sorted(set(self.targets) - set(ATTENTION_PROJECTIONS))
        if not self.targets or bad:
            raise ValueError(f"lora targets must be a non-empty subset of {list(ATTENTION_PROJECTIONS)}, got {bad or []}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model: torch.nn.Module, args: LoraArgs, owned: Iterable[int] | None = None) -> PeftModel:
    """Wrap a partitioned MoE: adapters + owned experts + routers + norms trainable, the rest frozen.

    owned=None keeps the experts the model already trains.
    """
    args.validate()
    if owned is None:
        owned = owned_experts(model)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=list(args.targets),
                        lora_dropout=args.dropout, bias="none")
    peft_model = get_peft_model(model, config)  # freezes every base parameter
    set_owned_experts(peft_model.base_model.model, owned)
    for name, p in peft_model.named_parameters():
        if parse_expert_param(name) is None and name.endswith(_ALWAYS_TRAINED):
            p.requires_grad_(True)
    return peft_model


def adapter_param_names(model: torch.nn.Module) -> list[str]:
    """The LoRA parameters (what replaces the attention matrices in a node's upload)."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def merge_and_export(peft_model: PeftModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Fold the adapters into the base weights and save a plain checkpoint (no peft needed to load).

    The merge changes the wrapped model in place: export a copy if training continues.
    """
    merged = peft_model.merge_and_unload()
    return save_hf_atomic(merged, out_dir, tokenizer)
