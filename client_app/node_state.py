"""What a node keeps between rounds, in a node-local directory.

In deployment every Flower message runs in a fresh process and `context.state` is sent back
by an exit handler that silently drops large states, so weights and optimizer moments live
on the node's disk instead. Each saved state is tagged with the global step it ends at and
lives in its own directory `state/step-<n>/`; the newest two are kept, so a coordinator that
restarts and repeats a round finds the state that round started from.

A save never touches a finished state: it writes a temporary directory, fsyncs it and renames
it into place (an atomic rename on POSIX). Saving a step that is already there (a repeated round)
first moves the old state aside as `.replaced-step-<n>`; a crash between the two renames leaves
that, and the next load or save puts it back, so no crash loses the state of a step. Nothing here
unpickles: tensors and optimizer moments are safetensors files, the rest JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import fsync_dir, write_text_atomic
from common.checks import all_finite
from training.parallel import like

log = logging.getLogger("spes.node")

KEEP_STATES = 2
_STEP_DIR = re.compile(r"^step-(\d{12})$")
_REPLACED = ".replaced-"  # + the step directory's name: a state moved aside while its step is saved again
_SEP = "::"  # optimizer tensor key: <parameter name>::<state key>
_OPTIONAL = ("base", "residual", "own_delta", "local")  # delta-sync files, written only when non-empty


def remove_tree(path: Path) -> None:
    """Delete a directory tree if it is there. One already gone (another process or a crash removed
    it) is no error, nor one the OS will not delete: a later save's cleanup tries again."""
    shutil.rmtree(path, ignore_errors=True)


def recover_replaced(root: Path) -> None:
    """Put back a state moved aside by a same-step save that crashed before its new state was in
    place; drop one whose replacement made it."""
    if not root.is_dir():
        return
    for aside in root.glob(f"{_REPLACED}step-*"):
        final = root / aside.name.removeprefix(_REPLACED)
        if final.exists():
            remove_tree(aside)
        else:
            os.replace(aside, final)
            log.warning("put back %s: a save of the same step was cut short", final)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str], whole=lambda t: t
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name, so it survives a change of
    which parameters are trainable (experts reassigned) and needs no pickle. `whole` gathers a
    sharded moment (training/parallel.py `full`), so a node of several ranks saves what one would."""
    out = {}
    for param, state in optimizer.state.items():
        name = names.get(param)
        if name is None:
            continue
        for key, value in state.items():
            value = whole(value) if isinstance(value, torch.Tensor) else value
            if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
                raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a plain tensor")
            out[f"{name}{_SEP}{key}"] = value.detach().cpu().contiguous()
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]
) -> int:
    """Load name-keyed moments for the parameters that have them; returns how many parameters got state."""
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        name, _, slot = key.rpartition(_SEP)
        per_param.setdefault(name, {})[slot] = value
    restored = 0
    for name, slots in per_param.items():
        param = named.get(name)
        if param is None or not param.requires_grad:
            continue  # an expert this node no longer owns
        state = {}
        for slot, value in slots.items():
            if value.dim() and value.shape != param.shape:
                raise ValueError(
                    f"saved optimizer state {name}.{slot} has shape {tuple(value.shape)}, "
                    f"parameter has {tuple(param.shape)}"
                )
            # A moment goes where its parameter is, sharded like it on a node of several ranks.
            state[slot] = value.to(param.device) if value.dim() == 0 else like(value.to(dtype=param.dtype), param)
        optimizer.state[param] = state
        restored += 1
    return restored


@dataclass
class NodeState:
    """Trained tensors of the owned experts, name-keyed optimizer moments, data position.

    With delta sync, also the node's copy of the global model as the round started (`base`),
    the uplink's quantisation residual (`residual`, error feedback; none = zero) and the decoded
    differences of the owned experts it sent (`own_delta`, applied when the coordinator relays
    them); with streaming fragments, the trained tensors it did not send (`local`: the next round
    continues them, not the global copy); each is a file only when it holds tensors.
    """

    global_step: int = 0
    owned: list[int] = field(default_factory=list)
    stream: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    owned_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    own_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    local: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, root: Path, keep: int = KEEP_STATES) -> Path:
        """Write `root/step-<global_step>/` atomically; keep the newest `keep` states."""
        root.mkdir(parents=True, exist_ok=True)
        recover_replaced(root)
        for stale in root.glob(".tmp-*"):  # left by a crash mid-save
            remove_tree(stale)
        tmp = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        files = {
            "owned.safetensors": {k: v.contiguous() for k, v in self.owned_tensors.items()},
            "optimizer.safetensors": self.optimizer,
            **{f"{key}.safetensors": getattr(self, key) for key in _OPTIONAL if getattr(self, key)},
        }
        sizes = {}
        for fname, tensors in files.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / fname))
            _fsync_file(tmp / fname)
            sizes[fname] = (tmp / fname).stat().st_size
        meta = {"global_step": self.global_step, "owned": self.owned, "stream": self.stream, "sizes": sizes}
        write_text_atomic(tmp / "meta.json", json.dumps(meta))
        fsync_dir(tmp)
        final = root / f"step-{self.global_step:012d}"
        if final.exists():  # the same step saved again (a repeated round): replace it
            aside = root / f"{_REPLACED}{final.name}"
            os.replace(final, aside)
            os.replace(tmp, final)
            fsync_dir(root)
            remove_tree(aside)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        for old_step in saved_steps(root)[:-keep]:
            remove_tree(root / f"step-{old_step:012d}")
        return final

    def non_finite(self) -> str | None:
        """The first saved tensor holding a NaN or an Inf ("optimizer/<name>", ...), or None."""
        for group in ("owned_tensors", "optimizer", *_OPTIONAL):
            for name, tensor in (getattr(self, group, None) or {}).items():
                if tensor.is_floating_point() and not all_finite(tensor):
                    return f"{group}/{name}"
        return None

    @classmethod
    def load(cls, root: Path, step: int) -> NodeState | None:
        """The state saved at exactly `step`, or None if there is none or it is damaged."""
        recover_replaced(root)
        directory = root / f"step-{step:012d}"
        if not (directory / "meta.json").exists():
            return None
        try:
            meta = json.loads((directory / "meta.json").read_text())
            for fname, size in meta["sizes"].items():
                actual = (directory / fname).stat().st_size
                if actual != size:
                    raise ValueError(f"{fname} has {actual} bytes, {size} were written")
            state = cls(
                global_step=int(meta["global_step"]),
                owned=[int(e) for e in meta["owned"]],
                stream={k: int(v) for k, v in meta["stream"].items()},
                owned_tensors=load_file(str(directory / "owned.safetensors")),
                optimizer=load_file(str(directory / "optimizer.safetensors")),
                **{
                    key: load_file(str(directory / f"{key}.safetensors"))
                    for key in _OPTIONAL
                    if f"{key}.safetensors" in meta["sizes"]
                },
            )
            if state.global_step != step:
                raise ValueError(f"meta.json says step {state.global_step}")
            # A NaN in the moments keeps the file's size but poisons every later round: refuse it here,
            # so the node asks for the full model and starts its moments afresh.
            if bad := state.non_finite():
                raise ValueError(f"{bad} holds NaN or Inf")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("saved node state %s is damaged (%s); it is discarded", directory, exc)
            remove_tree(directory)
            return None
        return state


def saved_steps(root: Path) -> list[int]:
    """Global steps of the saved states under `root`, ascending (a state moved aside by a cut-short
    same-step save is put back first)."""
    if not root.is_dir():
        return []
    recover_replaced(root)
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
