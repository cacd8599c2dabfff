"""Build the partitioned MoE from model arguments or from a Hugging Face checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

from model.args import MoEArgs, build_config
from model.experts import expert_modules, materialize_empty, partition_experts, per_layer, set_absent_experts


def build_model(
    args: MoEArgs,
    vocab_size: int | None = None,
    owned: Iterable[int] | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    special_tokens: dict[str, int | None] | None = None,
    frozen_dtype: torch.dtype | None = None,
    empty: bool = False,
    shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    absent: Iterable[int] = (),
    absent_policy: str = "skip",
) -> Qwen3MoeForCausalLM:
    """A freshly initialised model with per-expert modules; `owned=None` trains every expert.

    `frozen_dtype` (e.g. torch.bfloat16) stores the experts this node does not own in that dtype.
    On the meta device nothing is allocated: used to report the size of the large presets.
    `empty=True`: parameters are allocated on `device` but hold garbage, for a caller that loads a
    whole state dict next (a node each round). It skips the random initialisation and the copies
    of the fused experts, most of a build's time (1b preset on one CPU thread, measured 2026-11-29: 22.7 s -> 0.6 s,
    docs/node-round.md).
    `shard` (with `empty`): applied on the meta device before allocation, so that only what it
    leaves on this process is allocated (FSDP, training/parallel.py).
    `absent`: experts the model does not hold (partial residency, model/experts.py); with `empty`
    they are dropped on the meta device, so they are never allocated.
    """
    args.validate()
    config = build_config(args, vocab_size, **(special_tokens or {}))
    if seed is not None:
        torch.manual_seed(seed)
    absent = per_layer(absent, args.num_layers)
    if any(absent) and shard is not None:
        raise ValueError("a sharded node (FSDP) holds every expert: partial residency needs one rank")
    if empty and torch.device(device).type != "meta":
        model = _empty_model(config, owned, torch.device(device), frozen_dtype, shard, absent)
        set_absent_experts(model, absent, absent_policy)  # only the routers' mask is left to set
        return model
    if shard is not None:
        raise ValueError("build_model(shard=...) needs empty=True: a sharded model is loaded, not initialised")
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    model = partition_experts(model, owned, frozen_dtype=frozen_dtype)
    set_absent_experts(model, absent, absent_policy)
    return model


def _empty_model(config, owned, device: torch.device, frozen_dtype, shard=None, absent=()) -> Qwen3MoeForCausalLM:
    with torch.device("meta"):
        model = partition_experts(Qwen3MoeForCausalLM(config), owned, frozen_dtype=frozen_dtype)
        for m, row in zip(expert_modules(model), absent):
            m.set_absent(row)
    if shard is not None:
        model = shard(model)
    materialize_empty(model, device)
    # Non-persistent buffers are in no state dict, so nothing would overwrite their garbage:
    # recompute the ones this architecture has, and refuse any other (a transformers change).
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    persistent = set(model.state_dict())
    unknown = [n for n, _ in model.named_buffers() if n not in persistent and not n.startswith("model.rotary_emb.")]
    if unknown:
        raise RuntimeError(f"build_model(empty=True) cannot restore the non-persistent buffers {unknown}")
    return model


def load_pretrained(
    path: str | Path, owned: Iterable[int] | None = None, frozen_dtype: torch.dtype | None = None
) -> Qwen3MoeForCausalLM:
    """Load an exported (or any Qwen3-MoE) checkpoint and partition its experts."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if model.config.model_type != "qwen3_moe":
        raise ValueError(f"{path}: expected a qwen3_moe checkpoint, got model_type={model.config.model_type!r}")
    return partition_experts(model, owned, frozen_dtype=frozen_dtype)
