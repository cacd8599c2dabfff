"""Training FLOPs of a run, counted from the model's shapes, so that methods compare at equal compute.

Per token and per weight matrix of W parameters on the token's path: 2W for the forward, 2W for the
gradient of the input, 2W for the gradient of the weight (Kaplan et al. 2020; Hoffmann et al. 2022).
On the path: attention, router and LM head in every layer, and `top_k` of the experts; the embedding
is a lookup. Attention over the sequence adds 2 x 2 x seq_len x (heads x head_dim) per layer forward
(scores and the weighted sum, causal mask not discounted), twice that backward.

A SPES node computes no weight gradient for the experts it does not own: of the `top_k` experts a
token passes, on average `top_k x owned / E` are the node's own when routing is balanced (an
assumption: the measured load is not used). Full training (DiLoCo, FedAvg, centralized) computes
every weight gradient. The optimizer step and the coordinator's aggregation are left out (per
parameter, not per token: under 0.1 % of a round here).
"""

from __future__ import annotations

import dataclasses

from common.spec import RunSpec
from strategy.assignment import make_assignment


def _head_dim(spec: RunSpec) -> int:
    return spec.model.hidden_size // spec.model.num_heads


def flops_per_token(spec: RunSpec, vocab: int) -> float:
    m = spec.model
    d, hd = m.hidden_size, _head_dim(spec)
    attn_w = d * m.num_heads * hd * 2 + d * m.num_kv_heads * hd * 2  # q, o and k, v projections
    shared_w = m.num_layers * (attn_w + d * m.num_experts) + d * vocab  # + routers + LM head
    expert_w = m.num_layers * 3 * d * m.expert_ffn  # one expert, every layer
    attn_seq = m.num_layers * 2 * 2 * spec.data.seq_len * m.num_heads * hd
    active_w = shared_w + m.top_k * expert_w
    trained_experts = m.top_k * _owned_share(spec)
    return 2 * active_w + 2 * active_w + 2 * (shared_w + trained_experts * expert_w) + 3 * attn_seq


def _owned_share(spec: RunSpec) -> float:
    """The share of the experts whose weight gradients a node computes (1 for full training)."""
    if spec.strategy.assignment == "replicated":
        return 1.0
    owners = make_assignment(spec.strategy.assignment, spec.model.num_experts, spec.nodes).owners
    return max(len(o) for o in owners) / spec.model.num_experts


def training_flops(spec: RunSpec, tokens: float, centralized: bool = False) -> float:
    """FLOPs to train on `tokens` tokens (all nodes together); `centralized`: every weight trained."""
    vocab = spec.model.vocab_size or spec.data.vocab_size
    if centralized:
        spec = _as_full(spec)
    return flops_per_token(spec, vocab) * tokens


def _as_full(spec: RunSpec) -> RunSpec:
    return dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, assignment="replicated"))
