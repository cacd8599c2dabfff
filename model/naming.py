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


# -- Streaming fragments (strategy.fragments) ---------------------------------------------------
_LAYER = re.compile(r"\blayers\.(?P<layer>\d+)\.")


def fragment_of(name: str, fragments: int) -> int:
    """The fragment a parameter is synced with: layer l's in fragment l mod F (strided, Streaming
    DiLoCo, arXiv 2501.18512); the embeddings in the first, the final norm and LM head in the last."""
    m = _LAYER.search(name)
    if m is not None:
        return int(m["layer"]) % fragments
    return 0 if "embed_tokens" in name else fragments - 1


def fragment_names(names: Iterable[str], fragment: int, fragments: int) -> list[str]:
    return [n for n in names if fragment_of(n, fragments) == fragment]


def synced_fragment(server_round: int, fragments: int) -> int:
    """Round r (from 1) syncs fragment (r - 1) mod F, so each fragment is synced every F rounds."""
    return (server_round - 1) % fragments


# -- LoRA (model/lora.py) ----------------------------------------------------------------------
# The global model names an adapter by the module it adapts, `<module>.lora_A.weight` /
# `<module>.lora_B.weight`, and a wrapped base weight by its plain Hugging Face name: peft's
# `base_model.model.` prefix, `.base_layer` and adapter name are internal to a node, so the
# coordinator, checkpoints and codecs never see them.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_ALWAYS_TRAINED = (".mlp.gate.weight", "norm.weight")  # routers, RMSNorms (incl. q/k-norm)
_PEFT_PREFIX = "base_model.model."
_PLAIN_ADAPTER = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def is_adapter_name(name: str) -> bool:
    return _PLAIN_ADAPTER.match(name) is not None


def peft_to_plain(name: str, adapter: str = "default") -> str:
    """A peft parameter name (with or without the PeftModel prefix) as the global model names it."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    name = name.replace(".base_layer.", ".")
    return re.sub(rf"\.(lora_A|lora_B)\.{re.escape(adapter)}\.", r".\1.", name)


def plain_to_peft(name: str, targets: Iterable[str], adapter: str = "default", prefix: bool = True) -> str:
    """The peft name of a plain parameter name; `prefix=False` names it inside `get_base_model()`."""
    m = _PLAIN_ADAPTER.match(name)
    if m is not None:
        out = f"{m['module']}.{m['part']}.{adapter}.weight"
    else:
        module, _, leaf = name.rpartition(".")
        out = f"{module}.base_layer.{leaf}" if module.rpartition(".")[2] in set(targets) else name
    return _PEFT_PREFIX + out if prefix else out


def trained_param_names(names: Iterable[str], owned: Iterable[int], lora: bool) -> list[str]:
    """What a node trains and sends (plain names, in the order of `names`).

    Without LoRA: every shared parameter and the owned experts. With LoRA: the adapters, routers,
    norms and owned experts; the base weights (embeddings, attention, LM head) stay frozen.
    """
    wanted = set(owned)
    out = []
    for n in names:
        e = parse_expert_param(n)
        if e is not None:
            keep = e.expert in wanted
        else:
            keep = not lora or is_adapter_name(n) or n.endswith(LORA_ALWAYS_TRAINED)
        if keep:
            out.append(n)
    return out
