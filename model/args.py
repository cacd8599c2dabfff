"""Model arguments (one dataclass per preset) and the transformers config they map to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from transformers import Qwen3MoeConfig


@dataclass
class MoEArgs:
    """Shape of a Qwen3-MoE model. Presets live in conf/model/*.yaml."""

    name: str = "tiny"
    # None: take the vocabulary size of the run's tokenizer.
    vocab_size: int | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    expert_ffn: int = 128
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    # Renormalise the top-k routing weights to sum to 1 (needed to upcycle a dense model exactly).
    norm_topk_prob: bool = True
    # How the run's first model is made: random | upcycle (from the dense checkpoint dense_path,
    # see model/upcycle.py). The coordinator does this once; nodes receive the weights.
    init: str = "random"
    dense_path: str | None = None
    upcycle_noise_std: float = 0.0  # N(0, std) added to a random fraction of each expert's entries
    upcycle_noise_fraction: float = 0.5
    upcycle_router_init: str = "normal"  # zeros | normal (init_std) | down_proj_std (std of the dense down-projection)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def validate(self, seq_len: int | None = None) -> None:
        """Value checks only (nodes repeat them); whether dense_path exists is the coordinator's check.

        `seq_len` (the run's data.seq_len), when given, must fit in max_seq_len.
        """
        self._validate_init()
        # Types first: a string from a command-line override would otherwise
        # fail below with a TypeError that names no key.
        sizes = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "num_experts",
            "top_k",
            "expert_ffn",
            "max_seq_len",
        )
        for key in sizes + ("vocab_size",):
            value = getattr(self, key)
            if key == "vocab_size" and value is None:
                continue  # taken from the tokenizer
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be an integer >= 1, got {value!r}")
        for key in ("rope_theta", "rms_norm_eps", "init_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"model.{key} must be a finite number > 0, got {value!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"model.norm_topk_prob must be true or false, got {self.norm_topk_prob!r}")
        if not 1 <= self.top_k < self.num_experts:
            raise ValueError(f"model.top_k must be in [1, num_experts) = [1, {self.num_experts}), got {self.top_k}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            # Rotary embeddings rotate pairs of channels: an odd head size fails in the first forward.
            raise ValueError(
                f"model.hidden_size / num_heads (the head size, {self.hidden_size // self.num_heads}) must be even"
            )
        if isinstance(seq_len, int) and seq_len > self.max_seq_len:  # its type is data.validate's check
            raise ValueError(
                f"data.seq_len ({seq_len}) exceeds model.max_seq_len ({self.max_seq_len}), the model's maximum "
                "position; lower data.seq_len or raise model.max_seq_len"
            )

    def _validate_init(self) -> None:
        if self.init not in INIT_MODES:
            raise ValueError(f"model.init must be one of {list(INIT_MODES)}, got {self.init!r}")
        if self.upcycle_router_init not in ROUTER_INITS:
            raise ValueError(
                f"model.upcycle_router_init must be one of {list(ROUTER_INITS)}, got {self.upcycle_router_init!r}"
            )
        if not self.upcycle_noise_std >= 0:
            raise ValueError(f"model.upcycle_noise_std must be >= 0, got {self.upcycle_noise_std}")
        if not 0 <= self.upcycle_noise_fraction <= 1:
            raise ValueError(f"model.upcycle_noise_fraction must be in [0, 1], got {self.upcycle_noise_fraction}")
        if self.init == "upcycle":
            if not self.dense_path:
                raise ValueError(
                    "model.init=upcycle needs model.dense_path (a dense Hugging Face checkpoint dir or name)"
                )
            if self.vocab_size is None:
                # Nodes build their model from these args and the tokenizer's length, which can be
                # smaller than the dense checkpoint's (padded) embedding matrix.
                raise ValueError(
                    "model.init=upcycle needs model.vocab_size set to the dense checkpoint's config.vocab_size"
                )
            if not self.norm_topk_prob:
                raise ValueError(
                    "model.init=upcycle needs model.norm_topk_prob=true (else the MoE is not the dense model)"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


INIT_MODES = ("random", "upcycle")
ROUTER_INITS = ("zeros", "normal", "down_proj_std")


def build_config(args: MoEArgs, vocab_size: int | None = None, **special_tokens: int | None) -> Qwen3MoeConfig:
    """The stock transformers config for `args`; every layer is an MoE layer, embeddings untied."""
    vocab = args.vocab_size or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is null and no tokenizer vocabulary size was given")
    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=args.expert_ffn,  # unused: no dense MLP layers
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=args.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        rms_norm_eps=args.rms_norm_eps,
        initializer_range=args.init_std,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.expert_ffn,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=args.norm_topk_prob,
        use_cache=False,
        **special_tokens,
    )


def count_parameters(config: Qwen3MoeConfig) -> dict[str, int]:
    """Analytic parameter counts: total, shared (non-expert) and one expert across all layers."""
    h, L, E = config.hidden_size, config.num_hidden_layers, config.num_experts
    hd = config.head_dim
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h + 2 * hd  # q, k, v, o projections + q/k RMSNorm
    per_layer_shared = attn + 2 * h + E * h  # two RMSNorms + router
    shared = 2 * config.vocab_size * h + h + L * per_layer_shared  # untied embed/head + final norm
    per_expert = L * 3 * h * config.moe_intermediate_size
    return {"total": shared + E * per_expert, "shared": shared, "per_expert": per_expert}
