"""One fault case's result, as docs/reliability.md tabulates it."""

from dataclasses import dataclass


@dataclass
class Outcome:
    fault: str
    before: str  # what the code did before this suite existed (issue 7 / 8 findings)
    now: str  # what happened in this run
    ok: bool  # the global model stayed finite and unchanged by the fault / the run survived
