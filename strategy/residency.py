"""Which experts each node holds, per layer (partial residency, issue 25): the coordinator's choice.

- `all`: every expert (plain SPES).
- `owned`: the shared weights and the experts the node trains, nothing else: its downlink carries
  no other expert and its memory none.
- `owned+k`: also, in every layer, the k other experts the node's own tokens were routed to most
  (its reported expert load of the last round; before it reports, the federation's load, else the
  lowest ids). Re-chosen every `strategy.assignment_every` rounds and whenever its experts change;
  a node whose resident set changed gets its resident tensors whole (like an ownership move).

A node may ask for its own setting (node-config `residency`, sent in its setup reply): a node
smaller than the model asks for `owned`, whatever the run's default. The ask holds for that
partition until it asks again (it rejoins).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from model.naming import parse_expert_param

_OWNED_PLUS = re.compile(r"^owned\+(\d+)$")
Layers = list[list[int]]  # per layer, sorted expert ids


def extra_experts(residency: str) -> int | None:
    """k of `owned+k` (0 for `owned`), None for `all`; ValueError for anything else."""
    if residency == "all":
        return None
    if residency == "owned":
        return 0
    m = _OWNED_PLUS.match(residency)
    if m is None or int(m[1]) < 1:
        raise ValueError(f"strategy.residency must be all, owned or owned+<k>, k >= 1, got {residency!r}")
    return int(m[1])


class Residency:
    def __init__(self, residency: str, num_experts: int, every: int) -> None:
        self.extra = extra_experts(residency)
        self.num_experts, self.every = num_experts, every
        self.held: dict[int, Layers] = {}  # pid -> the experts it holds, per layer
        self.asks: dict[int, int | None] = {}  # pid -> k of the residency the node asked for itself

    def ask(self, pid: int, residency: str | None) -> None:
        """The node's own setting (None: the run's); it takes effect at the next `update`."""
        if residency is None:
            self.asks.pop(pid, None)
        else:
            self.asks[pid] = extra_experts(residency)
        self.held.pop(pid, None)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the sets chosen (asks come again with the nodes' setup)."""
        return {"held": {str(p): layers for p, layers in self.held.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.held = {
            int(p): [sorted(int(e) for e in row) for row in layers] for p, layers in state.get("held", {}).items()
        }

    def _extra(self, pid: int) -> int | None:
        return self.asks.get(pid, self.extra)

    def absent(self, pid: int) -> Layers | None:
        """Per layer, the experts `pid` does not hold; None when it holds every expert."""
        if self._extra(pid) is None or pid not in self.held:
            return None
        return [[e for e in range(self.num_experts) if e not in set(layer)] for layer in self.held[pid]]

    def update(
        self,
        server_round: int,
        owners: Mapping[int, Sequence[int]],
        loads: Mapping[int, Sequence[Sequence[float]]],
        federation: Sequence[Sequence[float]] | None,
        num_layers: int,
    ) -> dict[int, Layers]:
        """Choose again where it is due (every `every` rounds, a new node, changed experts); the
        nodes whose resident sets changed, with their new sets."""
        due = (server_round - 1) % self.every == 0
        changed = {}
        for pid, owned in owners.items():
            old, extra = self.held.get(pid), self._extra(pid)
            if extra is None or not (due or old is None or any(not set(owned) <= set(layer) for layer in old)):
                continue
            new = self._choose(owned, extra, loads.get(pid) or federation, num_layers)
            if new != old:
                self.held[pid] = changed[pid] = new
        for pid in set(self.held) - set(owners):
            del self.held[pid]
        return changed

    def _choose(
        self, owned: Sequence[int], extra: int, load: Sequence[Sequence[float]] | None, num_layers: int
    ) -> Layers:
        mine = set(owned)
        out = []
        for layer in range(num_layers):
            row = load[layer] if load else [0.0] * self.num_experts
            others = sorted((e for e in range(self.num_experts) if e not in mine), key=lambda e: (-row[e], e))
            out.append(sorted(mine | set(others[:extra])))
        return out


def mark_absent(load: Sequence[Sequence[float]], absent: Layers | None) -> list[list[float]]:
    """A node's expert load with NaN where it holds no expert (strategy/federation_load.robust_load
    leaves those out of the federation's median)."""
    gone = [set(skip) for skip in absent] if absent else [set() for _ in load]
    return [[float("nan") if e in skip else x for e, x in enumerate(row)] for row, skip in zip(load, gone)]


def resident_names(names: Iterable[str], absent: Layers | None) -> list[str]:
    """The parameters a node holds: every shared one, and each layer's experts not absent there."""
    if absent is None:
        return list(names)
    gone = {(layer, e) for layer, row in enumerate(absent) for e in row}
    return [n for n in names if (p := parse_expert_param(n)) is None or (p.layer, p.expert) not in gone]


def without_experts(names: Iterable[str], experts: Iterable[int]) -> list[str]:
    """`names` less every parameter of `experts` (all layers)."""
    skip = set(experts)
    return [n for n in names if (p := parse_expert_param(n)) is None or p.expert not in skip]


def absent_share(load: Sequence[Sequence[float]] | None, absent: Layers | None) -> dict[str, float]:
    """The share of a node's routed picks that went to experts it does not hold (mean over layers
    of the absent experts' shares of its reported load); nothing to report without load or absence."""
    if not load or not absent or not any(absent):
        return {}
    return {"absent_share": sum(sum(row[e] for e in gone) for row, gone in zip(load, absent)) / len(load)}


def flat_mask(absent: Layers, num_experts: int) -> list[int]:
    """[layers x experts] 1 = absent, flattened for a ConfigRecord."""
    return [int(e in set(row)) for row in absent for e in range(num_experts)]
