"""Who takes part in a run, keyed by partition id.

A partition id is stable across restarts of a node (Flower's node id is not): a node that comes
back under a new node id takes its old place. A member is active until it went `reassign_after`
rounds without a valid update; it needs the whole model after it missed a round, joined, or came
back, and after a resume (it may have lost its state meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Member:
    partition_id: int
    node_id: int
    active: bool = True
    absent: int = 0  # rounds in a row without a valid update
    needs_full: bool = True  # send the whole model next time
    strikes: int = 0  # updates the guard dropped (strategy/guard.py)
    quarantined: bool = False  # out of the run for good: never active again


class Membership:
    def __init__(self, node_partitions: Mapping[int, int]) -> None:
        """`node_partitions`: Flower node id -> partition id of the nodes the run starts with."""
        self.members: dict[int, Member] = {
            pid: Member(pid, node_id) for node_id, pid in sorted(node_partitions.items(), key=lambda kv: kv[1])
        }

    @property
    def active(self) -> list[int]:
        """Partition ids of the active members, ascending (a node's rank is its position here)."""
        return sorted(p for p, m in self.members.items() if m.active)

    def node_id(self, pid: int) -> int:
        return self.members[pid].node_id

    def partition_of(self, node_id: int) -> int | None:
        """The active partition Flower node `node_id` serves, if any."""
        return next((p for p in self.active if self.members[p].node_id == node_id), None)

    def join(self, node_id: int, pid: int) -> str:
        """A node joined, or came back (possibly under a new node id); the event: "join" or "return"."""
        member = self.members.get(pid)
        if member is None:
            self.members[pid] = Member(pid, node_id)
            return "join"
        if member.quarantined:
            raise ValueError(f"partition {pid} is quarantined by the guard and cannot rejoin this run")
        member.node_id, member.active, member.absent, member.needs_full = node_id, True, 0, True
        return "return"

    def record_round(self, valid: set[int], needs_full_after_update: Callable[[int], bool]) -> None:
        """Count rounds absent; a node that sent a valid update needs the whole model next round only
        when `needs_full_after_update(pid)` says so, any other needs it."""
        for pid in self.active:
            member = self.members[pid]
            member.absent = 0 if pid in valid else member.absent + 1
            member.needs_full = needs_full_after_update(pid) if pid in valid else True

    def strike(self, pids: Iterable[int], limit: int) -> list[int]:
        """Count a strike for each of `pids`; those now at `limit` strikes (0: no limit) are quarantined."""
        out = []
        for pid in pids:
            member = self.members[pid]
            member.strikes += 1
            if limit and member.strikes >= limit and not member.quarantined:
                member.quarantined = True
                out.append(pid)
        return out

    def absent_for(self, rounds: int) -> list[int]:
        """Active partitions without a valid update for `rounds` rounds in a row (none when rounds is 0)."""
        return [p for p in self.active if rounds and self.members[p].absent >= rounds]

    def deactivate(self, pids: list[int]) -> None:
        for pid in pids:
            self.members[pid].active = False

    def all_need_full(self) -> None:
        for member in self.members.values():
            member.needs_full = True

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {
            str(p): {"active": m.active, "absent": m.absent, "strikes": m.strikes, "quarantined": m.quarantined}
            for p, m in self.members.items()
        }

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Members from a saved run; one not connected now stays inactive until it returns, one
        connected now but unknown to the saved run stays as it is. Everyone needs the whole model."""
        connected = dict(self.members)
        self.members = {}
        for key, m in state.items():
            pid = int(key)
            now = connected.get(pid)
            quarantined = bool(m.get("quarantined", False))
            self.members[pid] = Member(
                pid,
                now.node_id if now else -1,
                active=bool(m["active"]) and now is not None and not quarantined,
                absent=int(m["absent"]),
                strikes=int(m.get("strikes", 0)),
                quarantined=quarantined,
            )
        for pid, member in connected.items():
            self.members.setdefault(pid, member)
        self.all_need_full()
