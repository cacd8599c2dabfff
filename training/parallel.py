"""Data parallelism inside one node: n ranks share the node's batch and shard its model with FSDP2.

A node with several GPUs (node-config `gpus=n`, client_app/ranks.py starts the ranks) runs the
same round on every rank, SPMD: the same received tensors, the same order, the same data stream.
What differs is kept here, apart from the model and the loop that use it:

- the model is sharded with `torch.distributed.fsdp.fully_shard` (FSDP2), one group per layer's
  experts, one per decoder layer, one for the rest. Frozen experts are sharded too (they are
  most of the memory); they keep the owned experts' dtype, because FSDP2 gathers one dtype per
  group. Sharding happens on the meta device, before any weight is allocated, so no rank ever
  holds the whole model: each copies its shard out of the full tensors that arrived.
- each step's batch is split into n equal row chunks (`batch_size` must divide by n), so the
  node's tokens per step and round are unchanged. FSDP averages the gradients over ranks, which
  is the gradient of the whole batch's mean cross-entropy (every row has the same length). The
  router balancing loss is not a mean over tokens (E * sum_i f_i * P_i): its f and P are summed
  over ranks first (`sum_over_ranks`, differentiable), so every rank computes the whole batch's
  loss and the gradient is the one a single rank would get.
- what leaves the node (reply, saved state) is gathered into full tensors (`full`) with the
  same names and shapes as a one-rank node's; rank 0 alone saves and replies.

On CPU the ranks use gloo, so all of this runs (and is tested) without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one node."""

    rank: int
    world: int

    def part(self, block: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a step's batch."""
        rows = block.shape[0]
        if rows % self.world:
            raise ValueError(f"train.batch_size={rows} does not divide among gpus={self.world} ranks")
        size = rows // self.world
        return block[self.rank * size : (self.rank + 1) * size]

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: cuda:<rank> where the node trains on CUDA."""
        return torch.device("cuda", self.rank) if device.type == "cuda" else device


def current() -> Ranks | None:
    """The node's ranks where this process is one of several, else None (a one-device node)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size())


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks, differentiable (its gradient is summed back the same way)."""
    # torch's functional collective (the one torch.distributed.nn.functional now points to): its
    # backward is the same sum of the incoming gradients.
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(t, "sum", dist.group.WORLD)


def mean_over_ranks(value: float) -> float:
    """A per-rank number averaged over the ranks (the same on every rank afterwards)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def barrier() -> None:
    dist.barrier()


def shard_model(model: nn.Module, device_type: str) -> nn.Module:
    """Shard `model` over the ranks with FSDP2 (call it on the meta device, before loading);
    `device_type` is where its shards will live (cuda or cpu)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from model.experts import expert_modules

    if next(model.parameters()).device.type != "meta":
        raise ValueError("shard_model expects a model on the meta device")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for experts in expert_modules(model):
        experts.sharded = True
        fully_shard(experts, mesh=mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor, the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `target` is: this rank's shard where `target` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return value.to(target.device)
    # Every rank holds the whole `value`: each takes its own chunk, nothing is sent.
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def load_whole(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole tensors into `model` (strict): on a sharded model, each rank its own shards."""
    if current() is not None:
        targets = model.state_dict()
        tensors = {n: like(t, targets[n]) for n, t in tensors.items()}
    model.load_state_dict(tensors, strict=True)
