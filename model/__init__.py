"""The MoE model: presets, expert partitioning, losses and Hugging Face export.

Nothing here imports Flower, so the model side can be tested and reused alone.
"""

from model.args import MoEArgs, build_config, count_parameters
from model.build import build_model, load_pretrained
from model.experts import (
    PartitionedExperts,
    partition_experts,
    set_experts_implementation,
    set_frozen_dtype,
    set_owned_experts,
)
from model.naming import (
    ExpertParam,
    expert_param_names,
    group_expert_params,
    parse_expert_param,
    shared_param_names,
)

__all__ = [
    "MoEArgs",
    "build_config",
    "count_parameters",
    "build_model",
    "load_pretrained",
    "PartitionedExperts",
    "partition_experts",
    "set_owned_experts",
    "set_frozen_dtype",
    "set_experts_implementation",
    "ExpertParam",
    "expert_param_names",
    "group_expert_params",
    "parse_expert_param",
    "shared_param_names",
]
