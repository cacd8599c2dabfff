"""Upcycle a dense Qwen3 (or Llama-style) checkpoint into the partitioned Qwen3-MoE.

Embeddings, LM head, attention (q/k/v/o, q/k-norm) and norms are copied; the dense MLP is
copied into every expert. With top-k weights renormalised to sum to 1 (`norm_topk_prob`) and no
noise, every token's MoE output is the dense MLP's output, so the MoE computes the dense model's
logits exactly, whatever the router says. Noise on a random fraction of each expert's entries
breaks the symmetry between the copies (docs/method.md section 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3MoeForCausalLM
from transformers.initialization import no_init_weights

from model.args import ROUTER_INITS, MoEArgs, build_config
from model.experts import partition_experts
from model.naming import parse_expert_param

_ROUTER_SUFFIX = ".mlp.gate.weight"
_QK_NORM = (".self_attn.q_norm.weight", ".self_attn.k_norm.weight")


def _rope(cfg) -> tuple[str, float | None]:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_type", "default"), params.get("rope_theta", getattr(cfg, "rope_theta", None))


def check_compatible(dense_cfg, moe_cfg, args: MoEArgs) -> None:
    """Raise naming the model.* key to change when the dense model's shape differs from the preset."""
    dense_head_dim = getattr(dense_cfg, "head_dim", None) or dense_cfg.hidden_size // dense_cfg.num_attention_heads
    pairs = [
        ("hidden_size", dense_cfg.hidden_size, moe_cfg.hidden_size),
        ("num_layers", dense_cfg.num_hidden_layers, moe_cfg.num_hidden_layers),
        ("num_heads", dense_cfg.num_attention_heads, moe_cfg.num_attention_heads),
        ("num_kv_heads", dense_cfg.num_key_value_heads, moe_cfg.num_key_value_heads),
        ("hidden_size / num_heads (head_dim)", dense_head_dim, moe_cfg.head_dim),
        ("expert_ffn", dense_cfg.intermediate_size, moe_cfg.moe_intermediate_size),
        ("vocab_size", dense_cfg.vocab_size, moe_cfg.vocab_size),
        ("rms_norm_eps", dense_cfg.rms_norm_eps, moe_cfg.rms_norm_eps),
        ("rope_theta", _rope(dense_cfg)[1], _rope(moe_cfg)[1]),
    ]
    bad = [f"model.{key}: dense {d!r} vs MoE {m!r}" for key, d, m in pairs if d != m]
    if bad:
        raise ValueError(f"dense checkpoint does not fit the '{args.name}' MoE preset: " + "; ".join(bad))
    unsupported = [
        (_rope(dense_cfg)[0] != "default", f"rope_type {_rope(dense_cfg)[0]!r} (only 'default' RoPE)"),
        (getattr(dense_cfg, "attention_bias", False), "attention_bias=true"),
        (getattr(dense_cfg, "mlp_bias", False), "mlp_bias=true"),
        (getattr(dense_cfg, "use_sliding_window", False), "use_sliding_window=true"),
        (
            getattr(dense_cfg, "hidden_act", "silu") != getattr(moe_cfg, "hidden_act", "silu"),
            f"hidden_act {getattr(dense_cfg, 'hidden_act', None)!r}",
        ),
    ]
    reasons = [why for bad_flag, why in unsupported if bad_flag]
    if reasons:
        raise ValueError(f"cannot upcycle this dense model into Qwen3-MoE: {', '.join(reasons)}")


def _load_dense(dense: PreTrainedModel | str | Path) -> PreTrainedModel:
    if isinstance(dense, PreTrainedModel):
        return dense
    return AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32)


@torch.no_grad()
def upcycle_dense(
    dense: PreTrainedModel | str | Path,
    moe_args: MoEArgs,
    noise_std: float | None = None,
    noise_fraction: float | None = None,
    router_init: str | None = None,
    seed: int = 0,
    owned: Iterable[int] | None = None,
    special_tokens: dict[str, int | None] | None = None,
) -> Qwen3MoeForCausalLM:
    """The partitioned MoE made from `dense` (a model, a checkpoint dir or a hub name).

    noise_std / noise_fraction / router_init default to the moe_args.upcycle_* fields.
    router_init: zeros | normal (N(0, moe_args.init_std)) | down_proj_std (N(0, std of that
    layer's dense down-projection)). `moe_args.vocab_size=None` takes the dense vocabulary.
    Works on the meta device (shape checks only) for sizing the large presets.
    """
    noise_std = moe_args.upcycle_noise_std if noise_std is None else noise_std
    noise_fraction = moe_args.upcycle_noise_fraction if noise_fraction is None else noise_fraction
    router_init = moe_args.upcycle_router_init if router_init is None else router_init
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {list(ROUTER_INITS)}, got {router_init!r}")
    if not moe_args.norm_topk_prob:
        raise ValueError("upcycling needs model.norm_topk_prob=true: else the MoE output is not the dense MLP's")

    dense = _load_dense(dense)
    dcfg = dense.config
    if special_tokens is None:
        special_tokens = {
            k: getattr(dcfg, k, None)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(dcfg, k, None) is not None
        }
    config = build_config(moe_args, dcfg.vocab_size, **special_tokens)
    check_compatible(dcfg, config, moe_args)

    src = dict(dense.named_parameters())
    # A tied head is one tensor under the embedding's name; the MoE's head is untied.
    src["lm_head.weight"] = dense.get_output_embeddings().weight
    device = src["model.embed_tokens.weight"].device
    # Every parameter is overwritten (and checked to be), so skip the random init.
    with torch.device(device), no_init_weights():
        moe = Qwen3MoeForCausalLM(config)
    moe = partition_experts(moe, owned)
    _copy_dense(
        moe,
        src,
        _Init(
            noise_std,
            noise_fraction,
            router_init,
            moe_args.init_std,
            torch.Generator().manual_seed(seed),
            meta=device.type == "meta",
        ),
    )
    return moe


@dataclass
class _Init:
    """How upcycled parameters that are not plain copies start."""

    noise_std: float
    noise_fraction: float
    router_init: str
    init_std: float
    gen: torch.Generator
    meta: bool  # shapes only: nothing is copied or drawn


def _copy_dense(moe: Qwen3MoeForCausalLM, src: dict[str, torch.Tensor], init: _Init) -> None:
    """Write every MoE parameter from the dense tensors `src`: experts get the dense MLP (plus
    noise), routers their init, q/k norms missing from a Llama-style model start at ones."""
    missing_qk_norm = False
    written = set()
    for name, param in moe.named_parameters():
        expert = parse_expert_param(name)
        source = None
        if expert is not None:
            source = src[f"model.layers.{expert.layer}.mlp.{expert.proj}.weight"]
        elif name.endswith(_ROUTER_SUFFIX):
            if not init.meta:
                dense_down = src[f"{name[: -len(_ROUTER_SUFFIX)]}.mlp.down_proj.weight"]
                _init_router(param, init.router_init, init.init_std, dense_down, init.gen)
        elif name not in src and name.endswith(_QK_NORM):
            # Llama-style: no q/k-norm in the dense model. Ones is the closest start, but the
            # MoE still normalises q and k, so its logits differ from the dense model's.
            missing_qk_norm = True
            param.fill_(1.0)
        elif name in src:
            source = src[name]
        else:
            raise KeyError(f"upcycle: the dense checkpoint has no tensor for {name}")
        if source is not None:
            if tuple(source.shape) != tuple(param.shape):
                raise ValueError(f"upcycle: {name} has shape {tuple(param.shape)}, dense has {tuple(source.shape)}")
            param.copy_(source.to(param.dtype))
            if expert is not None and init.noise_std > 0 and init.noise_fraction > 0 and not init.meta:
                _add_noise(param, init.noise_std, init.noise_fraction, init.gen)
        written.add(name)
    unwritten = sorted({n for n, _ in moe.named_parameters()} - written)
    if unwritten:
        raise RuntimeError(f"upcycle left parameters uninitialised: {unwritten[:5]}")
    if missing_qk_norm:
        warnings.warn(
            "upcycle: the dense model has no q/k-norm (Llama-style); they start at ones, so the MoE "
            "does not reproduce the dense model's logits exactly",
            stacklevel=3,
        )


def _init_router(
    weight: torch.Tensor, mode: str, init_std: float, dense_down: torch.Tensor, gen: torch.Generator
) -> None:
    if mode == "zeros":
        weight.zero_()
        return
    std = init_std if mode == "normal" else float(dense_down.float().std())
    weight.copy_(torch.randn(weight.shape, generator=gen) * std)


def _add_noise(weight: torch.Tensor, std: float, fraction: float, gen: torch.Generator) -> None:
    """N(0, std) on a random `fraction` of the entries; generated on CPU so a seed gives the same model anywhere."""
    mask = torch.rand(weight.shape, generator=gen) < fraction
    noise = torch.randn(weight.shape, generator=gen) * std
    weight.add_((noise * mask).to(device=weight.device, dtype=weight.dtype))


def upcycle_from_args(
    args: MoEArgs, seed: int = 0, special_tokens: dict[str, int | None] | None = None
) -> Qwen3MoeForCausalLM:
    """The run's initial model for `model.init=upcycle` (every model.upcycle_* key applied)."""
    if args.init != "upcycle" or not args.dense_path:
        raise ValueError("upcycle_from_args needs model.init=upcycle and model.dense_path")
    return upcycle_dense(args.dense_path, args, seed=seed, special_tokens=special_tokens)
