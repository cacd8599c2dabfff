"""Start and stop local Flower 1.42 processes for simulation and loopback deployment.

Everything runs from a *run directory*: ``FLWR_HOME`` is ``<run_dir>/.flwr`` (never
``~/.flwr``), logs and the SuperLink database live there, and every process is
started and stopped by us.

Facts about Flower 1.42 this module relies on (checked against the installed sources):

* ``flower-superlink`` serves the Control, Fleet and Runtime APIs over HTTP on a
  single ``--host``/``--port``; ``--control-api-address``/``--fleet-api-address``
  are deprecated no-ops for the HTTP APIs. ``flwr`` connections in
  ``$FLWR_HOME/config.toml`` must point at that HTTP address. ``GET /health``
  answers 200 once it serves.
* The SuperLink starts ``flower-superexec`` in a *new session* (detached), which
  starts ``flwr-simulation``/``flwr-serverapp``, which starts Ray (gcs_server,
  raylet, workers, ...). None of these are in the SuperLink's process group, so we
  tag every process we start with an environment variable (inherited by all
  descendants, Ray included) and, on teardown, kill whatever still carries the tag.
* Sub-processes are started by bare name (``flower-superexec``, ``flwr-simulation``),
  so ``PATH`` must contain the environment's ``bin`` directory.
* ``flwr run --stream`` exits 0 even when the run fails; the outcome has to be read
  from ``flwr ls --run-id <id> --format json`` (``status`` ``finished:completed`` /
  ``finished:failed`` / ``finished:stopped``).
* ``--run-config`` accepts only keys of ``[tool.flwr.app.config]`` (otherwise the
  SuperLink answers a bare "Invalid run configuration"), does no type checking, and
  its inline parser is the regex ``key=('...'|"..."|\\S+)``: values are TOML, strings
  must be quoted and cannot contain the quote character that delimits them.

No torch import here: this module must stay cheap to import.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from engine.console import ConsoleFilter
from engine.flwr_config import (
    EXIT_NOT_STARTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TIMEOUT,
    HOST,
    SIM_CONNECTION,
    RunConfigValue,
    TlsFiles,
    check_run_config,
    find_free_port,
    flower_exe,
    flwr_json,
    log_tail,
    run_config_args,
    wait_http_ok,
    write_connection,
)
from engine.processes import ProcessGroup, SigtermAsExit

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class FlowerLocal:
    """Common part: a SuperLink (simulation or not) plus an ``flwr`` connection."""

    connection: str
    simulation: bool
    console = "all"  # what `flwr run` output reaches stdout: CONSOLE_MODES

    def __init__(
        self,
        run_dir: Path,
        log_file: Path | None = None,
        startup_timeout: float = 60.0,
        stop_grace: float = 10.0,
        tls: TlsFiles | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.tls = tls
        self.extra_env = dict(extra_env or {})
        self.flwr_home = self.run_dir / ".flwr"
        self.log_file = Path(log_file) if log_file else self.run_dir / "superlink.log"
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.port: int | None = None
        self._group = ProcessGroup()
        self._sigterm = SigtermAsExit()
        self.timings: dict[str, float] = {}

    # public bits ----------------------------------------------------------------
    @property
    def tag(self) -> str:
        """Value of ``SPES_LAUNCHER_TAG`` carried by every process started here."""
        return self._group.tag

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("SuperLink not started")
        return f"{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return self._env(self.flwr_home)

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return {**self._group.env(flwr_home), **self.extra_env}

    def processes(self) -> list[int]:
        """Live PIDs started (directly or not) by this object."""
        return self._group.alive()

    # lifecycle ------------------------------------------------------------------
    def __enter__(self) -> FlowerLocal:
        t0 = time.monotonic()
        self._sigterm.install()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.flwr_home.mkdir(parents=True, exist_ok=True)
            self._start_superlink()
            write_connection(
                self.flwr_home, self.connection, self.address, None if self.tls is None else self.tls.ca_cert
            )
            self._after_superlink()
        except BaseException:
            self._teardown()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        log.info(
            "%s up on %s in %.1fs (logs in %s)",
            type(self).__name__,
            self.address,
            self.timings["start_s"],
            self.run_dir,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        t0 = time.monotonic()
        try:
            self._group.stop(self.stop_grace)
        finally:
            self._sigterm.restore()
        self.timings["stop_s"] = time.monotonic() - t0
        log.info("%s stopped in %.1fs", type(self).__name__, self.timings["stop_s"])

    def _superlink_cmd(self, port: int) -> list[str]:
        # Dependencies come from the environment installed from requirements.lock, never
        # from a per-run `uv sync` (see docs/join-as-supernode.md).
        security = ["--insecure"] if self.tls is None else self.tls.superlink_args()
        cmd = [
            flower_exe("flower-superlink"),
            *security,
            "--isolation",
            "subprocess",
            "--host",
            HOST,
            "--port",
            str(port),
            "--database",
            str(self.flwr_home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            cmd.append("--simulation")
        return cmd

    def _start_superlink(self) -> None:
        for attempt in range(3):
            port = find_free_port()
            proc = self._group.start(
                "flower-superlink", self._superlink_cmd(port), self.env, self.run_dir, self.log_file
            )
            scheme = "http" if self.tls is None else "https"
            if wait_http_ok(
                f"{scheme}://{HOST}:{port}/health",
                proc,
                self.startup_timeout,
                None if self.tls is None else self.tls.ca_cert,
            ):
                self.port = port
                return
            tail = log_tail(self.log_file)
            if proc.poll() is not None and "address already in use" in tail.lower() and attempt < 2:
                log.warning("port %d taken, retrying", port)
                continue
            raise RuntimeError(
                f"flower-superlink did not become ready on {HOST}:{port} within "
                f"{self.startup_timeout:.0f}s (exit code {proc.poll()}); "
                f"log {self.log_file}:\n{tail}"
            )

    def _after_superlink(self) -> None:
        """Hook for LocalDeployment (start SuperNodes)."""

    # running an app -------------------------------------------------------------
    def _run(
        self,
        app_dir: Path,
        run_config: Mapping[str, RunConfigValue],
        timeout_s: float | None,
        federation_config: str | None = None,
    ) -> int:
        if self.port is None:
            raise RuntimeError("use inside `with`")
        app_dir = Path(app_dir).resolve()
        check_run_config(app_dir, run_config)
        cmd = [flower_exe("flwr"), "run", str(app_dir), self.connection, *run_config_args(run_config, self.run_dir)]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        cmd.append("--stream")
        return _FlwrRun(self, cmd, timeout_s, self.console).execute()


class _FlwrRun:
    """One ``flwr run --stream``: forward its output, find the outcome, stop on abort."""

    def __init__(self, link: FlowerLocal, cmd: list[str], timeout_s: float | None, console: str = "all") -> None:
        self.link = link
        self.cmd = cmd
        self.timeout_s = timeout_s
        self.run_id: int | None = None
        self.out_log = link.run_dir / "flwr-run.log"
        self.console = ConsoleFilter(console, self.out_log)

    def _pump(self, stream: IO[bytes]) -> None:
        # Chunks, not lines: a progress bar redraws with "\r" and no newline for a whole round.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        read = getattr(stream, "read1", stream.read)
        with open(self.out_log, "ab") as tee:
            while True:
                raw = read(65536)
                tee.write(raw)
                tee.flush()
                text = decoder.decode(raw, final=not raw)
                segments = self.console.segments(text) + (self.console.rest() if not raw else [])
                shown = []
                for segment in segments:
                    if self.run_id is None and (m := _RUN_ID.search(segment)):
                        self.run_id = int(m.group(1))
                    shown.append(self.console.shown(segment))
                try:
                    sys.stdout.write("".join(shown))
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
                if not raw:
                    return

    def execute(self) -> int:
        link = self.link
        t0 = time.monotonic()
        deadline = None if self.timeout_s is None else t0 + self.timeout_s
        log.info("$ %s", " ".join(self.cmd))
        proc = subprocess.Popen(  # noqa: S603
            self.cmd,
            env=link.env,
            cwd=str(link.run_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        pump.start()
        next_scan = time.monotonic() + 5.0
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.error("run timed out after %.0fs; stopping it", self.timeout_s)
                    self._abort(proc)
                    return EXIT_TIMEOUT
                try:
                    rc = proc.wait(timeout=1.0 if left is None else min(1.0, left))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= next_scan:  # keep track of new sessions
                        link._group.alive()
                        next_scan = time.monotonic() + 5.0
                    continue
            pump.join(timeout=10)
            if self.run_id is None:
                log.error("`flwr run` exited with %s without starting a run (see %s)", rc, self.out_log)
                return EXIT_NOT_STARTED
            status = self._final_status(deadline)
            link.timings["run_s"] = time.monotonic() - t0
            if status is None:
                log.error("run %s did not finish after its log stream ended", self.run_id)
                self._abort(proc)
                return EXIT_TIMEOUT
            ok = status.get("status") == "finished:completed"
            (log.info if ok else log.error)(
                "run %s: %s (%s) in %.1fs",
                self.run_id,
                status.get("status"),
                status.get("status-details"),
                link.timings["run_s"],
            )
            return EXIT_OK if ok else EXIT_RUN_FAILED
        except BaseException:  # KeyboardInterrupt, SystemExit from SIGTERM, ...
            log.error("interrupted; stopping the run")
            self._abort(proc)
            raise

    def _status(self) -> dict[str, Any] | None:
        data = flwr_json(["ls", self.link.connection, "--run-id", str(self.run_id)], self.link.env, self.link.run_dir)
        for run in (data or {}).get("runs", []):
            if str(run.get("run-id")) == str(self.run_id):
                return run
        return None

    def _final_status(self, deadline: float | None) -> dict[str, Any] | None:
        # The stream ends when the run has finished; allow a short lag for the status,
        # longer only if the caller's timeout allows.
        limit = time.monotonic() + 30.0
        if deadline is not None:
            limit = max(min(limit, deadline), time.monotonic() + 5.0)
        while True:
            status = self._status()
            if status and str(status.get("status", "")).startswith("finished"):
                return status
            if time.monotonic() > limit:
                return None
            time.sleep(1.0)

    def _abort(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop every unfinished run on our SuperLink, then the ``flwr run`` CLI."""
        link = self.link
        try:
            data = flwr_json(["ls", link.connection], link.env, link.run_dir, timeout=30)
            run_ids = {
                str(r.get("run-id"))
                for r in (data or {}).get("runs", [])
                if not str(r.get("status", "")).startswith("finished")
            }
            if self.run_id is not None:
                run_ids.add(str(self.run_id))
            for run_id in sorted(run_ids):
                subprocess.run(  # noqa: S603
                    [flower_exe("flwr"), "stop", run_id, link.connection],
                    env=link.env,
                    cwd=str(link.run_dir),
                    capture_output=True,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                )
                log.info("stopped run %s", run_id)
        except (subprocess.TimeoutExpired, OSError) as err:
            log.warning("flwr stop failed: %s", err)
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)


# ------------------------------------------------------------------------ public API
class SimulationSuperLink(FlowerLocal):
    """``flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1
    --port <free> --database <run_dir>/.flwr/state.db``, cwd ``run_dir``, own session,
    log in ``run_dir``; connection ``spes-sim`` in ``<run_dir>/.flwr/config.toml``.

    ``__exit__`` stops it and everything it spawned (SuperExec, ServerApp, Ray).
    """

    connection = SIM_CONNECTION
    simulation = True

    def __enter__(self) -> SimulationSuperLink:
        super().__enter__()
        return self

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, RunConfigValue],
        num_nodes: int,
        cpus_per_node: int = 1,
        timeout_s: float | None = None,
    ) -> int:
        """``flwr run <app_dir> spes-sim --run-config ... --federation-config
        "num-supernodes=N client-resources-num-cpus=C" --stream``; 0 on success."""
        fed = f"num-supernodes={int(num_nodes)} client-resources-num-cpus={int(cpus_per_node)}"
        return self._run(app_dir, run_config, timeout_s, fed)


def run_app(
    app_dir: Path,
    run_dir: Path,
    num_nodes: int,
    run_config: Mapping[str, RunConfigValue],
    cpus_per_node: int = 1,
    timeout_s: float | None = None,
    extra_env: Mapping[str, str] | None = None,
    console: str = "all",
) -> int:
    """Run a Flower app in a fresh local simulation and tear everything down.

    Returns 0 if the run finished ``completed``, 1 if it failed or was stopped,
    2 if ``flwr run`` could not start it, 124 on timeout. KeyboardInterrupt (and
    SIGTERM, as SystemExit) stop the run and the processes, then propagate.
    ``timeout_s`` bounds the run, not the SuperLink start/stop. ``extra_env`` is added to
    the environment of every Flower process (e.g. ``SPES_NODE_WORK_DIR`` for the nodes).

    ``console`` chooses what of the run's output reaches stdout: ``all`` (everything, the
    default), ``coordinator`` (the app's ``[spes]`` lines and errors) or
    ``coordinator+nodes``; see :class:`ConsoleFilter`. ``flwr-run.log`` gets everything.
    """
    check_run_config(Path(app_dir), run_config)  # fail before starting anything
    with SimulationSuperLink(Path(run_dir), extra_env=extra_env) as link:
        link.console = console
        return link.run(app_dir, run_config, num_nodes, cpus_per_node, timeout_s)
