"""What of a run's output reaches the console of `python -m sim` (the rest stays in the log file)."""

from __future__ import annotations

import re
from pathlib import Path

# ------------------------------------------------------------------ console output
CONSOLE_MODES = ("all", "coordinator", "coordinator+nodes")
OWN_PREFIXES = ("[spes]", "[sim]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray prefixes what its workers print: "(ClientAppActor pid=123) ", "(raylet, ip=10.0.0.1) ".
_RAY_PREFIX = re.compile(r"^\((?P<who>[A-Za-z_][\w.]*)(?: pid=\d+)?(?:, ip=[\d.]+)?\) ?")
_ERROR = re.compile(r"^(ERROR|CRITICAL)\b|^Traceback \(most recent call last\)|^[\w.]*(Error|Exception)\b:")
_SEGMENT = re.compile(r"[^\r\n]*[\r\n]")


class ConsoleFilter:
    """Which pieces of ``flwr run --stream`` output reach the terminal (the log file
    ``flwr-run.log`` always gets everything).

    ``all``: everything, as Flower prints it. ``coordinator``: lines (and ``\\r``-redrawn
    progress bars) that start with ``[spes]``/``[sim]``, plus errors: ERROR/CRITICAL log
    lines and whole tracebacks, preceded once by where the full log is.
    ``coordinator+nodes`` also passes what the simulated nodes print (Ray's
    ``(ClientAppActor pid=...)`` lines, e.g. per-step progress bars).
    """

    def __init__(self, mode: str, log_path: Path) -> None:
        if mode not in CONSOLE_MODES:
            raise ValueError(f"console mode {mode!r}; expected one of {CONSOLE_MODES}")
        self.mode = mode
        self.log_path = log_path
        self._partial = ""
        self._in_traceback = False
        self._hinted = False

    def segments(self, text: str) -> list[str]:
        """Completed pieces of ``text`` (each ends in ``\\n`` or ``\\r``); the rest waits."""
        text = self._partial + text
        out = _SEGMENT.findall(text)
        self._partial = text[sum(len(s) for s in out) :]
        return out

    def rest(self) -> list[str]:
        """The unterminated tail, at end of stream."""
        tail, self._partial = self._partial, ""
        return [tail] if tail else []

    def shown(self, segment: str) -> str:
        """What to print for one segment ("" to drop it)."""
        if self.mode == "all":
            return segment
        body = _ANSI.sub("", segment).rstrip("\r\n")
        node = _RAY_PREFIX.match(body)
        if node:
            body = body[node.end() :]
        if self._in_traceback:
            # A traceback is indented lines ending with the unindented exception line.
            self._in_traceback = body[:1] in (" ", "\t") or not body.strip()
            return segment
        if _ERROR.search(body):
            self._in_traceback = body.startswith("Traceback")
            if not self._hinted:
                self._hinted = True
                return f"[sim] error output follows; full log: {self.log_path}\n{segment}"
            return segment
        if node:
            return segment if self.mode == "coordinator+nodes" else ""
        stripped = body.lstrip()
        if stripped.startswith(OWN_PREFIXES):
            return segment
        # tqdm clears its bar with a run of spaces before printing a line above it.
        if segment.endswith("\r") and not stripped:
            return segment
        return ""
