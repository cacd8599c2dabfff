"""How long a SuperLink takes to stop on SIGTERM while `flwr run --stream` is attached to a run in
progress: Flower's `flower-superlink` beside the README's `python -m federation.superlink`. Starts
each with one SuperNode on 127.0.0.1, runs the toy app (tests/fixtures/toy_app) for many rounds,
sends the SuperLink SIGTERM and prints the seconds until the SuperLink, the run's ServerApp
process and the streaming `flwr run` ended.

    .venv/bin/python scripts/superlink_sigterm.py
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.deployment import LocalDeployment  # noqa: E402

TOY_APP = ROOT / "tests" / "fixtures" / "toy_app"
LIMIT_S = 150.0


class ReadmeSuperLink(LocalDeployment):
    def _superlink_cmd(self, port: int) -> list[str]:
        return [sys.executable, "-m", "federation.superlink", *super()._superlink_cmd(port)[1:]]


def _live(word: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `word`."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            cmd, stat = (entry / "cmdline").read_bytes(), (entry / "stat").read_bytes()
        except (OSError, ValueError):
            continue
        if word.encode() in cmd and stat.split(b") ")[1][:1] != b"Z":
            out.append(int(entry.name))
    return out


def measure(kind: type[LocalDeployment], folder: Path) -> dict[str, float]:
    with kind(folder, num_nodes=1) as dep:
        cfg = {"min-nodes": 1, "num-rounds": 100_000, "out-file": str(folder / "out.json")}
        stream = threading.Thread(target=lambda: dep.run(TOY_APP, cfg, timeout_s=LIMIT_S + 60), daemon=True)
        stream.start()
        deadline = time.monotonic() + 60
        while not _live("flwr-serverapp") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)  # rounds under way, the stream attached
        (link,) = [proc for name, proc in dep._group.procs if name == "flower-superlink"]
        serverapps = _live("flwr-serverapp")
        t0 = time.monotonic()
        os.kill(link.pid, signal.SIGTERM)
        ended: dict[str, float] = {}
        while time.monotonic() - t0 < LIMIT_S and len(ended) < 3:
            gone = {
                "superlink": link.poll() is not None,
                "serverapp": not set(serverapps) & set(_live("flwr-serverapp")),
            }
            gone["flwr run --stream"] = not stream.is_alive()
            ended.update({k: round(time.monotonic() - t0, 1) for k, done in gone.items() if done and k not in ended})
            time.sleep(0.1)
    return ended


def main() -> None:
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, label in ((LocalDeployment, "flower-superlink"), (ReadmeSuperLink, "python -m federation.superlink")):
            ended = measure(kind, Path(tmp) / label.split()[-1])
            print(f"{label}: seconds after SIGTERM until each ended (not within {LIMIT_S:.0f} s if absent): {ended}")


if __name__ == "__main__":
    main()
