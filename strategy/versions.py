"""The coordinator's side of delta sync: the nodes' copy of the model, its versions, what each node holds.

`shadow` is the copy of the model an up-to-date node holds; it trails the global model by what
the downlink codec dropped (that gap is the coordinator's error-feedback residual: the next
round's difference includes it). Each tensor has a version, bumped whenever the shadow moves,
and the arrays of its last move (from version v-1 to v). For every node the coordinator knows
which version of every tensor it holds, so a node gets

  - nothing for a tensor it holds at the current version,
  - the last move's arrays when it holds the version before,
  - the whole fp32 value otherwise (it missed rounds or lost its state: a resync, bit-exact).

With the lossless fp32 downlink a move is the new value itself (as many bytes as its difference,
without the float rounding of "shadow + difference", which would come back as one more move a
round later). An expert with one owner whose new global value is exactly "shadow + the owner's
decoded uplink" moves by relaying the owner's own arrays: the other nodes reach the global value
bit-exactly, and the owner, who kept what it sent, applies it itself (`apply_own`), so its own
experts never come back down.

Nodes apply moves in the same float32 arithmetic as here (`common.codec.apply_delta`), so their copies are
bit-equal to the shadow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import Array, ArrayRecord

from common.codec import Codec, apply_delta, decode_sync, encode_delta, to_record
from strategy.validation import InvalidUpdate


@dataclass
class Move:
    arrays: dict[str, Array]  # record keys -> Arrays of the difference
    relayed_from: int | None  # partition whose uplink arrays these are, or None (downlink codec)


@dataclass
class NodeCopy:
    held: dict[str, int] = field(default_factory=dict)  # tensor -> version the node holds
    base_step: int = -1  # the saved node state that holds it
    own: dict[str, dict[str, Array]] = field(default_factory=dict)  # last valid uplink's owned experts


class VersionedDownlink:
    def __init__(self, downlink: Codec, uplink: Codec) -> None:
        self.downlink, self.uplink = downlink, uplink
        self.shadow: dict[str, torch.Tensor] = {}
        self.version: dict[str, int] = {}
        self.moves: dict[str, Move] = {}
        self.nodes: dict[int, NodeCopy] = {}
        self._pending: dict[int, dict[str, int]] = {}  # partition -> the versions its message carried

    # -- the shadow ------------------------------------------------------------------------------
    def refresh(self, params: Mapping[str, torch.Tensor], single_owner: Callable[[str], int | None]) -> None:
        """Move the shadow towards `params` (once per round, before the messages)."""
        if not self.shadow:
            self.shadow = {k: v.detach().clone() for k, v in params.items()}
            self.version = dict.fromkeys(params, 0)
            return
        for name, target in params.items():
            current = self.shadow[name]
            if torch.equal(target, current):
                continue
            move = self._relay(name, current, target, single_owner(name))
            if move is None and self.downlink.name == "fp32":
                # Lossless: the value itself, the same bytes as its fp32 difference, and exact; a
                # difference would leave float rounding behind, resent whole a round later.
                move = Move({name: Array(target.detach().cpu().contiguous().numpy())}, None)
            elif move is None:
                move = Move(dict(to_record(encode_delta({name: target - current}, self.downlink))), None)
            whole, delta = decode_sync(ArrayRecord(move.arrays), {name: current}, (self.downlink, self.uplink))
            self.shadow[name] = whole[name] if name in whole else apply_delta(current, delta[name])
            self.version[name] += 1
            self.moves[name] = move

    def _relay(self, name: str, current: torch.Tensor, target: torch.Tensor, owner: int | None) -> Move | None:
        copy = self.nodes.get(owner) if owner is not None else None
        if copy is None or name not in copy.own:
            return None
        _, delta = decode_sync(ArrayRecord(copy.own[name]), {name: current}, self.uplink)
        if not torch.equal(apply_delta(current, delta[name]), target):
            return None  # the global value is not the owner's copy (merged, averaged, outer step)
        return Move(copy.own[name], owner)

    # -- messages ------------------------------------------------------------------------------
    def message(self, pid: int, full: bool, holds: set[str] | None = None) -> tuple[ArrayRecord, int, bool]:
        """(arrays, base step, apply_own) for node `pid`, of the tensors it `holds` (None: all); what
        it will hold is committed on a valid reply."""
        copy = self.nodes.setdefault(pid, NodeCopy())
        arrays: dict[str, Array] = {}
        versions = {n: v for n, v in self.version.items() if holds is None or n in holds}
        self._pending[pid] = versions
        if full or not copy.held:
            arrays = {n: Array(self.shadow[n].detach().cpu().contiguous().numpy()) for n in versions}
            return ArrayRecord(arrays), -1, False
        apply_own = bool(copy.held) and self._can_apply_own(pid, copy)
        for name, version in versions.items():
            held = copy.held.get(name, -1)
            if held == version or (apply_own and name in copy.own):
                continue
            move = self.moves.get(name)
            if held == version - 1 and move is not None:
                arrays.update(move.arrays)
            else:
                arrays[name] = Array(self.shadow[name].detach().cpu().contiguous().numpy())
        return ArrayRecord(arrays), copy.base_step, apply_own

    def _can_apply_own(self, pid: int, copy: NodeCopy) -> bool:
        """The node's own last uplink moves every tensor it covers to the current version."""
        if not copy.own:
            return False
        for name in copy.own:
            held, version, move = copy.held.get(name, -1), self.version[name], self.moves.get(name)
            moved_by_it = held == version - 1 and move is not None and move.relayed_from == pid
            if not (moved_by_it or held == version):
                return False
        return True

    def commit(self, pid: int, ok: bool, state_step: int, own: Mapping[str, dict[str, Array]] | None = None) -> None:
        """After the round: a valid reply proves the node holds what it was sent, saved at `state_step`."""
        copy = self.nodes.setdefault(pid, NodeCopy())
        pending = self._pending.pop(pid, None)
        if ok and pending is not None:
            copy.held, copy.base_step, copy.own = dict(pending), state_step, dict(own or {})
        else:
            copy.held, copy.base_step, copy.own = {}, -1, {}  # unknown state: a full resync next time

    def reconstruct(
        self, record: ArrayRecord, expected: set[str], own: set[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Array]]]:
        """A node's trained tensors from its delta-sync reply (the copy it was sent plus its decoded
        difference), and the reply's arrays of its own experts (`own`), to relay to the others."""
        unexpected = {k.partition("#")[0] for k in record} - expected
        if unexpected:
            raise InvalidUpdate(f"{len(unexpected)} unexpected parameter(s), e.g. {sorted(unexpected)[:3]}")
        whole, deltas = decode_sync(record, {n: self.shadow[n] for n in expected}, self.uplink)
        if whole:
            raise InvalidUpdate(f"whole tensors in a delta-sync reply, e.g. {sorted(whole)[:3]}")
        relay = {n: {k: record[k] for k in record if k.partition("#")[0] == n} for n in own & set(deltas)}
        return {n: apply_delta(self.shadow[n], d) for n, d in deltas.items()}, relay

    def reset_nodes(self) -> None:
        self.nodes, self._pending = {}, {}

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": dict(self.version)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load(self, state: Mapping, shadow: Mapping[str, torch.Tensor]) -> None:
        """Continue from a checkpoint; nodes resync, so only the shadow (with its residual) matters."""
        self.shadow = {k: v.clone() for k, v in shadow.items()}
        self.version = {k: int(v) for k, v in state.get("version", {}).items()}
        if set(self.version) != set(self.shadow):
            self.version = dict.fromkeys(self.shadow, 0)
        self.moves = {}
        self.reset_nodes()
