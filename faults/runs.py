"""The fault cases that need processes to kill (used by faults.cases and the tests).

A coordinator SIGKILLed mid-run (the in-process engine: coordinator and nodes die together), a
SuperNode SIGKILLed in a loopback deployment, a Ray worker SIGKILLed in a Flower simulation. Every
process is started here or by the project's launcher and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from server_app.report import read_rounds

ROOT = Path(__file__).resolve().parent.parent
MICRO = [
    "model.hidden_size=64",
    "model.expert_ffn=32",
    "model.num_layers=2",
    "model.num_experts=6",
    "strategy.merge.top_k=2",
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.batch_size=4",
]


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from server_app import checkpoint

    latest = checkpoint.load_latest(run_dir / "checkpoint")
    if latest is None:
        raise RuntimeError(f"no checkpoint in {run_dir}")
    return latest[0]


def start_sim(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m sim <args>` in a session of its own (to kill by process group), output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "sim", *args],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _rounds_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _checkpointed(run_dir: Path) -> int:
    """The last round with a complete checkpoint (they are written atomically)."""
    from server_app import checkpoint

    return max(checkpoint.rounds(run_dir / "checkpoint"), default=0)


def resume_matches_uninterrupted(
    workdir: Path, rounds: int = 3, kill_after: int = 1, timeout_s: float = 420
) -> tuple[bool, str]:
    """Run `rounds` rounds straight; run again, SIGKILL the run after round `kill_after`, resume.

    In-process engine: the coordinator and its nodes die together, as a whole simulation does, and
    nothing gets to clean up. Outer Nesterov momentum is on, so a resume that lost the outer
    optimizer's buffers cannot match. Returns (final global weights bit-identical and the kill came
    before the end, a one-line account)."""
    common = [
        "nodes=2",
        f"rounds={rounds}",
        "strategy.local_steps=3",
        "deterministic=true",
        *MICRO,
        "strategy.merge.interval=6",
        "strategy.merge.decay_steps=60",
        "strategy.outer_lr=0.7",
        "strategy.outer_momentum=0.9",
        "engine=inprocess",
        "run_name=faultrun",
    ]
    straight = start_sim([*common, f"output_dir={workdir / 'straight'}"])
    out, _ = straight.communicate(timeout=timeout_s)
    if straight.returncode != 0:
        return False, f"uninterrupted run failed (exit {straight.returncode}): {out[-800:]}"
    interrupted_dir = workdir / "interrupted" / "faultrun"
    proc = start_sim([*common, f"output_dir={workdir / 'interrupted'}"])
    deadline = time.monotonic() + timeout_s
    while _checkpointed(interrupted_dir) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        return False, f"the run ended before it could be killed (exit {proc.returncode})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _checkpointed(interrupted_dir)
    if not kill_after <= killed_at < rounds:
        return False, f"the kill came with {killed_at} of {rounds} rounds checkpointed: nothing was interrupted"
    resumed = start_sim([*common, f"output_dir={workdir / 'interrupted'}", "resume=true"])
    out, _ = resumed.communicate(timeout=timeout_s)
    if resumed.returncode != 0:
        return False, f"resumed run failed (exit {resumed.returncode}): {out[-800:]}"
    a, b = _final_params(workdir / "straight" / "faultrun"), _final_params(interrupted_dir)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [r.round for r in read_rounds(interrupted_dir)]
    detail = (
        f"SIGKILLed with {killed_at} of {rounds} round(s) checkpointed, resumed; rounds logged {rows}; final "
        f"weights {'bit-identical to' if same else 'DIFFER from'} the uninterrupted run's"
    )
    return same and rows == list(range(1, rounds + 1)), detail


def supernode_killed_mid_round(workdir: Path, timeout_s: float = 900) -> tuple[bool, str]:
    """2 SuperNodes, min_nodes=1; SIGKILL SuperNode 1 once round 1 is logged; the run must complete,
    with the dead node's experts moved to the live one."""
    from engine.deployment import LocalDeployment

    overrides = [
        "nodes=2",
        "rounds=2",
        "strategy.local_steps=3",
        *MICRO,
        "strategy.min_nodes=1",
        "strategy.round_timeout_s=240",
        "strategy.reassign_after=1",
        "run_name=killnode",
    ]
    run_dir = workdir / "outputs" / "killnode"
    run_config = {"overrides": " ".join(shlex.quote(o) for o in overrides), "output-dir": str(workdir / "outputs")}
    killed = threading.Event()
    with LocalDeployment(workdir / "flower", num_nodes=2, node_config={"work-dir": str(workdir / "nodes")}) as dep:

        def killer() -> None:
            deadline = time.monotonic() + timeout_s
            while _rounds_logged(run_dir) < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            os.killpg(dep.node_procs[1].pid, signal.SIGKILL)
            killed.set()

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        t0 = time.monotonic()
        rc = dep.run(ROOT, run_config, timeout_s=timeout_s)
        run_s = time.monotonic() - t0
        thread.join(timeout=5)
    if rc != 0 or not (run_dir / "summary.json").exists():
        return False, f"run did not complete (exit {rc})"
    rows = read_rounds(run_dir)
    last = rows[-1]
    status = last.nodes.get("1", {}).get("status", "absent")
    ok = (
        killed.is_set()
        and len(rows) == 2
        and rows[0].nodes["1"]["status"] == "ok"
        and status != "ok"
        and last.owners == {"0": list(range(6))}
        and last.valid_updates == 1
        and last.federated_eval_loss is not None
    )
    return ok, (
        f"run completed 2 rounds in {run_s:.0f}s (exit {rc}); partition 1 in round 2: {status[:70]}; its "
        f"experts reassigned: owners after round 2 {last.owners}"
    )


def _actor_pids(marker: str) -> list[int]:
    """PIDs of Ray's ClientAppActor workers whose environment holds `marker`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            if b"ClientAppActor" in cmd and marker.encode() in Path(f"/proc/{name}/environ").read_bytes():
                pids.append(int(name))
        except OSError:
            continue
    return pids


def simulation_worker_killed(workdir: Path, timeout_s: float = 420) -> tuple[bool, str]:
    """3 simulated nodes; SIGKILL one Ray worker after round 1; the last two rounds must be all ok."""
    out_dir = workdir / "outputs"
    run_dir = out_dir / "deadworker"
    args = ["nodes=3", "rounds=4", "strategy.local_steps=2", *MICRO, "run_name=deadworker", f"output_dir={out_dir}"]
    proc = start_sim(args)
    deadline = time.monotonic() + timeout_s
    killed: list[int] = []
    while proc.poll() is None and time.monotonic() < deadline:
        if _rounds_logged(run_dir) >= 1 and not killed:
            pids = _actor_pids(str(run_dir / "nodes"))
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    if proc.returncode != 0 or not killed:
        return False, f"exit {proc.returncode}, worker killed: {bool(killed)}; {out[-600:]}"
    rows = read_rounds(run_dir)
    status = [[n["status"][:40] for n in r.nodes.values()] for r in rows]
    ok = len(rows) == 4 and all(n == "ok" for r in status[2:] for n in r)
    return ok, f"one Ray worker SIGKILLed after round 1; node status per round {status}"
