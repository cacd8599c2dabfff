"""What the coordinator prints: one line per round, under an overall progress bar on a terminal.

Every line starts with `[spes]` (the bar's description too): the simulation launcher
(`engine.launcher`, console="coordinator") passes exactly those lines, plus errors, from
`flwr run --stream` to the terminal and leaves Flower's and Ray's output to the log files.
The bar is drawn only when the output is a terminal: in a file or a CI log every round is one
plain line. Under a Flower simulation the ServerApp writes into the launcher's pipe, so the
launcher says whether its own output is a terminal (`SPES_CONSOLE_BAR`). Every line also goes
to the coordinator's log (`coordinator.log` in the run folder).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

from tqdm import tqdm

from strategy.round_record import RoundRecord

PREFIX = "[spes]"
ENV_BAR = "SPES_CONSOLE_BAR"  # "1" / "0": draw the progress bar or not (default: only on a terminal)
log = logging.getLogger("spes.server")


def say(text: str) -> None:
    """A coordinator line: printed (prefixed) and written to the coordinator's log."""
    line = f"{PREFIX} {text}"
    print(line, flush=True)
    log.info(line)


def bar_wanted(out: IO[str]) -> bool:
    if os.environ.get(ENV_BAR) in ("0", "1"):
        return os.environ[ENV_BAR] == "1"
    return bool(getattr(out, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_tokens(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class RunConsole:
    """`start` after the round-0 evaluation, `round` after each logged round, `close` at the end.

    Seconds per round come from the records' `wall_s` (seconds since the coordinator started),
    so they include evaluation and checkpointing; the ETA is the mean so far times the rounds left.
    """

    def __init__(self, total_rounds: int, out: IO[str] | None = None, bar: bool | None = None) -> None:
        """`bar`: draw the progress bar; None: only when `out` is a terminal (or as SPES_CONSOLE_BAR says)."""
        self.total = int(total_rounds)
        self.out = out if out is not None else sys.stdout
        self.durations: list[float] = []
        self._last_wall: float | None = None
        self._bar = None
        self._use_bar = bar_wanted(self.out) if bar is None else bar

    def _write(self, line: str) -> None:
        log.info(line)
        if self._bar is not None:
            self._bar.write(line, file=self.out)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def start(self, first_val_loss: float, wall_s: float = 0.0, done_rounds: int = 0) -> None:
        """Print round 0 and open the bar; `done_rounds` > 0 when resuming."""
        self._last_wall = wall_s
        self._write(f"{PREFIX} round {done_rounds}/{self.total} | held-out loss {first_val_loss:.4f}")
        if self._use_bar:
            self._bar = tqdm(
                total=self.total,
                initial=done_rounds,
                desc=f"{PREFIX} rounds",
                unit="round",
                file=self.out,
                ncols=80,
                leave=False,
                mininterval=0,
                dynamic_ncols=False,
            )

    def line(self, record: RoundRecord) -> str:
        """The round's line (also updates s/round statistics)."""
        wall = record.wall_s
        took = None
        if isinstance(wall, (int, float)) and self._last_wall is not None:
            took = float(wall) - self._last_wall
            self.durations.append(took)
        if isinstance(wall, (int, float)):
            self._last_wall = float(wall)
        rnd = record.round
        parts = [
            f"{PREFIX} round {rnd}/{self.total}",
            f"held-out loss {record.val_loss:.4f}",
            f"{format_tokens(float(record.tokens))} tokens",
            f"up {record.bytes_up / 1e6:.1f} MB, down {record.bytes_down / 1e6:.1f} MB",
        ]
        if took is not None:
            mean = sum(self.durations) / len(self.durations)
            parts.append(f"{took:.1f} s/round")
            parts.append(f"ETA {format_duration(mean * max(self.total - rnd, 0))}")
        if not record.applied:
            parts.append(f"NOT APPLIED ({record.refused})")
        failed = list(record.failed_nodes())
        if failed:
            parts.append(f"nodes not ok: {', '.join(failed)}")
        return " | ".join(parts)

    def round(self, record: RoundRecord) -> None:
        self._write(self.line(record))
        if self._bar is not None:
            self._bar.n = record.round
            self._bar.refresh()

    def close(self, message: str | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if message:
            self._write(f"{PREFIX} {message}")
