"""Which experts a node holds (partial residency, issue 25): the coordinator's choice, as plain data.

`owned`: a node holds the shared weights and the experts it trains, nothing else, so its downlink
carries no other expert and its memory none. (`owned+k`, the k other experts its tokens route to
most, is not built yet: docs/design.md.)
"""

from __future__ import annotations

from collections.abc import Iterable

from model.naming import parse_expert_param


def absent_experts(residency: str, owned: Iterable[int], num_experts: int) -> list[int]:
    """The experts a node does not hold under `residency`."""
    if residency == "all":
        return []
    if residency == "owned":
        mine = set(owned)
        return [e for e in range(num_experts) if e not in mine]
    raise ValueError(f"unknown residency {residency!r}")


def resident_names(names: Iterable[str], absent: Iterable[int]) -> list[str]:
    """The parameters a node holds: every shared one, and the experts that are not absent."""
    gone = set(absent)
    return [n for n in names if (e := parse_expert_param(n)) is None or e.expert not in gone]


def absent_share(load: list[list[float]] | None, absent: Iterable[int]) -> dict[str, float]:
    """The share of a node's routed picks that went to experts it does not hold (mean over layers
    of the absent experts' shares of its reported load); nothing to report without load or absence."""
    gone = list(absent)
    if not load or not gone:
        return {}
    return {"absent_share": sum(sum(row[e] for e in gone) for row in load) / len(load)}
