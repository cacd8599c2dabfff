"""The SPES strategy: expert assignment, per-node messages, aggregation and merging.

No training loop lives here; everything but `spes.py` is plain torch and testable alone.
"""

from strategy.aggregation import aggregate
from strategy.assignment import Ownership, contiguous_assignment, make_assignment, rebalance, replicated_assignment
from strategy.merging import merge_experts
from strategy.outer import OuterOptimizer
from strategy.spes import SpesStrategy

__all__ = [
    "aggregate",
    "Ownership",
    "contiguous_assignment",
    "make_assignment",
    "rebalance",
    "replicated_assignment",
    "merge_experts",
    "OuterOptimizer",
    "SpesStrategy",
]
