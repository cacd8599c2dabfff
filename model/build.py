"""Build the partitioned MoE from model arguments or from a Hugging Face checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

from model.args import MoEArgs, build_config
from model.experts import partition_experts


def build_model(
    args: MoEArgs,
    vocab_size: int | None = None,
    owned: Iterable[int] | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    special_tokens: dict[str, int | None] | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> Qwen3MoeForCausalLM:
    """A freshly initialised model with per-expert modules; `owned=None` trains every expert.

    `frozen_dtype` (e.g. torch.bfloat16) stores the experts this node does not own in that dtype.
    On the meta device nothing is allocated: used to report the size of the large presets.
    """
    args.validate()
    config = build_config(args, vocab_size, **(special_tokens or {}))
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    return partition_experts(model, owned, frozen_dtype=frozen_dtype)


def load_pretrained(
    path: str | Path, owned: Iterable[int] | None = None, frozen_dtype: torch.dtype | None = None
) -> Qwen3MoeForCausalLM:
    """Load an exported (or any Qwen3-MoE) checkpoint and partition its experts."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if model.config.model_type != "qwen3_moe":
        raise ValueError(f"{path}: expected a qwen3_moe checkpoint, got model_type={model.config.model_type!r}")
    return partition_experts(model, owned, frozen_dtype=frozen_dtype)
