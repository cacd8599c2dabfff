"""Names of a model's parameters: which are shared, which belong to which expert.

The global model travels as a flat name -> tensor mapping; these helpers are the only place
that knows how an expert parameter is named, so ownership, merging and export pair parameters
by name (the reference code flattened experts in a hash-randomised order and could subtract
mismatched matrices).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_EXPERT = re.compile(r"^(?P<prefix>.*\blayers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


@dataclass(frozen=True)
class ExpertParam:
    layer: int
    expert: int
    proj: str  # gate_proj | up_proj | down_proj


def parse_expert_param(name: str) -> ExpertParam | None:
    """The (layer, expert, projection) of an expert parameter, or None for a shared parameter."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    return ExpertParam(int(m["layer"]), int(m["expert"]), m["proj"])


def shared_param_names(names: Iterable[str]) -> list[str]:
    return [n for n in names if parse_expert_param(n) is None]


def expert_param_names(names: Iterable[str], experts: Iterable[int]) -> list[str]:
    """Every parameter (all layers) of the given expert indices."""
    wanted = set(experts)
    out = []
    for n in names:
        p = parse_expert_param(n)
        if p is not None and p.expert in wanted:
            out.append(n)
    return out


def group_expert_params(names: Iterable[str]) -> dict[int, dict[int, dict[str, str]]]:
    """layer -> expert -> projection -> parameter name."""
    groups: dict[int, dict[int, dict[str, str]]] = {}
    for n in names:
        p = parse_expert_param(n)
        if p is not None:
            groups.setdefault(p.layer, {}).setdefault(p.expert, {})[p.proj] = n
    return groups
