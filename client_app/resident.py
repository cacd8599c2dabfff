"""Nodes' models and optimizers kept in memory from one round to the next, where the process lives on.

Every round otherwise builds the model, loads the whole received state into it, restores the
AdamW moments from the node's disk and rebuilds the optimizer. In a Flower simulation a Ray
actor runs many rounds in one process, and there the previous round's live objects can be
reused. Flower's actor pool has no node affinity (any idle actor takes the next message), so
an actor serving several virtual nodes keeps those it can afford: the node it ran last always
(its memory was in use a moment ago anyway), older ones while their total size stays within
`train.resident_budget_mb`. In deployment each message runs in a fresh process: nothing is
found and the node reloads from disk as before.

A round takes its node's entry out (so a round that fails leaves nothing half-trained behind)
and at its end puts back its own. An entry that does not continue exactly where the round
starts (other global step, owned experts, run spec, workdir or device) is freed. The saved
state on disk is still written every round: it is what a restarted process or coordinator
continues from.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from dataclasses import dataclass

import torch

from client_app.node_state import NodeState
from training.parallel import local


@dataclass(frozen=True)
class ResidentKey:
    workdir: str
    partition_id: int
    spec_json: str
    device: str


@dataclass
class ResidentNode:
    key: ResidentKey
    model: torch.nn.Module
    plain: dict[str, str]  # model state-dict name -> plain (global-model) name
    optimizer: torch.optim.Optimizer
    state: NodeState  # what was saved at the end of the round, in memory

    def nbytes(self) -> int:
        """Bytes held by the entry's tensors, each storage counted once."""
        seen: dict[tuple[str, int], int] = {}
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        for part in (
            self.state.owned_tensors,
            self.state.optimizer,
            self.state.base,
            self.state.residual,
            self.state.own_delta,
            self.state.local,
        ):
            tensors += part.values()
        for t in map(local, tensors):  # a rank of a sharded node holds its shard only
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return sum(seen.values())


_kept: OrderedDict[ResidentKey, tuple[ResidentNode, int]] = OrderedDict()  # oldest first, with sizes


def take(key: ResidentKey, start_step: int, owned: list[int]) -> ResidentNode | None:
    """This node's kept entry if it continues exactly here, else None (and a stale entry is freed)."""
    entry, _ = _kept.pop(key, (None, 0))
    if entry is None:
        return None
    if entry.state.global_step == start_step and sorted(entry.state.owned) == sorted(owned):
        return entry
    cuda = _on_cuda([entry])
    del entry
    _collect(cuda)
    return None


def keep(entry: ResidentNode, budget_bytes: float) -> None:
    """Keep `entry` (always), and older entries while their total size is within `budget_bytes`."""
    _kept[entry.key] = (entry, entry.nbytes())
    evicted = []
    while len(_kept) > 1 and sum(size for _, size in list(_kept.values())[:-1]) > budget_bytes:
        evicted.append(_kept.popitem(last=False)[1][0])
    if evicted:
        cuda = _on_cuda(evicted)
        del evicted
        _collect(cuda)


def kept_partitions() -> list[int]:
    """Partitions kept in this process, oldest first."""
    return [k.partition_id for k in _kept]


def forget(workdir: str) -> None:
    """Free the kept entries of one work dir (its run has ended)."""
    gone = [_kept.pop(key)[0] for key in [k for k in _kept if k.workdir == workdir]]
    cuda = _on_cuda(gone)
    del gone
    _collect(cuda)


def drop() -> None:
    """Forget every kept node (tests, and a caller that wants the memory back)."""
    cuda = _on_cuda([e for e, _ in _kept.values()])
    _kept.clear()
    _collect(cuda)


def _on_cuda(entries: list[ResidentNode]) -> bool:
    return any(p.device.type == "cuda" for e in entries for p in e.model.parameters())


def _collect(cuda: bool) -> None:
    gc.collect()  # modules hold reference cycles: free them before the caller builds a new model
    if cuda:
        torch.cuda.empty_cache()
