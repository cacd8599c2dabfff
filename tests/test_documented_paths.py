"""The README's commands work as written.

The commands are read from README.md's "Running on a real federation" section, so an edit
there is what gets tested. Only addresses, paths and `<...>` placeholders are substituted, the
Hydra overrides are swapped for a micro model, and SuperNodes sharing this machine get their own
`--port` (as the README says they must). Every process is tagged and killed at the end, the
detached local SuperLink that `flwr run .` starts included.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from micro import MICRO_MODEL
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from engine.flwr_config import find_free_port
from engine.processes import ProcessGroup

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_ID = re.compile(r"Successfully started run (\d+)")
NO_UV_SYNC = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"

needs_flower = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (BIN / "flower-superlink").exists(),
    reason="needs Linux /proc and the Flower executables next to this interpreter",
)


# ------------------------------------------------------------------ reading the README
def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def fenced(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def commands(section: str) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, argv) of every command in the section's bash blocks."""
    out = []
    for block in fenced(section, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            env = {}
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                key, _, value = argv.pop(0).partition("=")
                env[key] = value
            if argv and argv[0] != "source":  # `source .venv/bin/activate`: BIN is first on PATH
                out.append((env, argv))
    return out


def find(cmds, *prefix: str) -> tuple[dict[str, str], list[str]]:
    found = [c for c in cmds if c[1][: len(prefix)] == list(prefix)]
    assert len(found) == 1, f"README: expected one `{' '.join(prefix)}` command, found {len(found)}"
    return found[0]


def substitute(argv: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for old, new in mapping.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def with_overrides(argv: list[str], overrides: list[str]) -> list[str]:
    """Replace the value of `overrides` in `--run-config` by `overrides`."""
    i = argv.index("--run-config")
    run_config, n = re.subn(r"overrides='[^']*'", "overrides='" + " ".join(overrides) + "'", argv[i + 1])
    assert n == 1, f"README: no overrides='...' in {argv[i + 1]!r}"
    return [*argv[: i + 1], run_config, *argv[i + 2 :]]


# ------------------------------------------------------------------------- helpers
def readme_run(group: ProcessGroup, cmd: list[str], home: Path, env: dict, log: Path) -> tuple[int, str]:
    """Run a README `flwr run` to its end; (run id, its console)."""
    text = finish(group.start("flwr-run", cmd, user_env(group, home, env), ROOT, log), log, 420)
    return int(RUN_ID.search(text).group(1)), text


def readme_status(cmds, name: str, run_id: int, group: ProcessGroup, home: Path, text: str) -> None:
    """The README's `flwr ls` says the run completed."""
    env, ls_cmd = find(cmds, "flwr", "ls", name)
    res = run_cli(
        [*substitute(ls_cmd, {"<run-id>": str(run_id)}), "--format", "json"], user_env(group, home, env), ROOT
    )
    status = json.loads(res.stdout[res.stdout.index("{") :])["runs"][0]
    assert status["status"] == "finished:completed", (status, text[-3000:])


def readme_connection(section: dict[str, str], port: int, ca_crt: Path) -> dict[str, str]:
    """The README's federation connection pointed at 127.0.0.1:<port> and a real ca.crt."""
    return {
        k: v.replace("<coordinator>", "127.0.0.1").replace("8000", str(port)).replace("/path/to/ca.crt", str(ca_crt))
        for k, v in section.items()
    }


def user_env(group: ProcessGroup, flwr_home: Path, extra: dict[str, str]) -> dict[str, str]:
    """A user's shell with the venv activated: nothing of the launcher's own settings for
    dependency installation, only what the README command sets."""
    env = group.env(flwr_home)
    env.pop(NO_UV_SYNC, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(BIN.parent)
    return {**env, **extra}


def run_cli(argv, env, cwd, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def run_status(env, cwd, connection: list[str], run_id: int) -> dict:
    res = run_cli(["flwr", "ls", *connection, "--run-id", str(run_id), "--format", "json"], env, cwd)
    data = json.loads(res.stdout[res.stdout.index("{") :])
    return next(r for r in data["runs"] if str(r["run-id"]) == str(run_id))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f}s; log:\n{log.read_text()[-3000:]}") from None
    return log.read_text(encoding="utf-8", errors="replace")


def no_runtime_installs(*homes: Path) -> None:
    """Flower's installer creates $FLWR_HOME/runtime-envs/ for its `uv sync`; it must never run."""
    for home in homes:
        assert not (home / "runtime-envs").exists(), f"`uv sync` ran under {home}"


# ---------------------------------------------------------------- lock and metadata
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _lock_lines() -> list[str]:
    return [l for l in (ROOT / "requirements.lock").read_text().splitlines() if l and not l.startswith("#")]


def _lowest_minor(spec: str) -> int:
    """Lowest Python 3.x (x in 8..14) a Requires-Python specifier admits."""
    return next(m for m in range(8, 15) if SpecifierSet(spec).contains(f"3.{m}.0"))


def test_requires_python_is_what_the_locked_packages_need():
    from importlib import metadata

    needs = {}
    for line in _lock_lines():
        name = line.split("==")[0]
        if rp := metadata.metadata(name).get("Requires-Python"):
            needs[name] = _lowest_minor(rp)
    ours = _lowest_minor(_pyproject()["project"]["requires-python"])
    assert needs["flwr"] == 11  # flwr 1.42: Requires-Python >=3.11
    assert ours == max(needs.values()) == 11, {k: v for k, v in needs.items() if v > 10}


def test_lock_matches_environment_and_ships_in_the_app_bundle():
    from flwr.cli.build import build_fab_from_disk

    check = subprocess.run(
        [sys.executable, "scripts/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr
    lines = _lock_lines()
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][^ ]*", l) for l in lines), lines
    assert "torch==2.13.0" in lines and any(l.startswith("flwr==1.42.") for l in lines)
    locked = dict(l.split("==") for l in lines)
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        assert req.specifier.contains(locked[req.name.lower()], prereleases=True), (dep, locked[req.name.lower()])
    # Flower's runtime installer runs `uv sync` on the pyproject.toml inside the FAB: the same pins must be there.
    fab = zipfile.ZipFile(BytesIO(build_fab_from_disk(ROOT)))
    shipped = tomllib.loads(fab.read("pyproject.toml").decode())
    assert shipped["tool"]["uv"]["constraint-dependencies"] == lines
    assert shipped["project"]["requires-python"] == _pyproject()["project"]["requires-python"]


def test_make_setup_installs_from_the_lock(tmp_path):
    res = subprocess.run(
        ["make", "-n", "-B", "setup", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    pip = [l for l in res.stdout.splitlines() if " -m pip install" in l]
    assert [p.split("install --quiet ")[1] for p in pip[1:]] == [
        "torch==2.13.0",
        "-r requirements.lock",
        '--no-deps -e ".[dev]"',
    ]


# -------------------------------------------------------------- the README's federation
@needs_flower
def test_readme_federation_recipe_with_tls_and_node_auth(tmp_path):
    """SuperLink, registration, 2 SuperNodes and `flwr run` exactly as the README has them, on
    127.0.0.1: the registered nodes finish a 1-round run, an unregistered key is refused."""
    section = readme_section("Running on a real federation")
    cmds = commands(section)
    conn_toml = tomllib.loads(fenced(section, "toml")[0])
    (name,) = set(conn_toml["superlink"]) - {"default", "local"}
    n_nodes, port = 2, find_free_port()
    coord = tmp_path / "coordinator"
    coord.mkdir()
    env, certs_cmd = find(cmds, "python", "-m", "federation.certs", "server")
    group = ProcessGroup()
    res = run_cli(substitute(certs_cmd, {"<coordinator>": "127.0.0.1"}), user_env(group, coord, env), coord)
    assert res.returncode == 0, res.stderr  # ca.crt, server.pem, server.key where the SuperLink command expects them
    home = coord / "flwr-home"
    home.mkdir()
    conn_toml["superlink"][name] = readme_connection(conn_toml["superlink"][name], port, coord / "ca.crt")
    import tomli_w

    (home / "config.toml").write_text(tomli_w.dumps(conn_toml))

    try:
        env, link_cmd = find(cmds, "python", "-m", "federation.superlink")
        link_cmd = substitute(link_cmd, {"0.0.0.0": "127.0.0.1", "8000": str(port)})
        link_log = coord / "superlink.log"
        link = group.start("superlink", link_cmd, user_env(group, home, env), coord, link_log)
        assert flag_value(link_cmd, "--database") == "state.db"
        env, register = find(cmds, "flwr", "supernode", "register")
        coord_env = user_env(group, home, env)
        wait_for(
            lambda: link.poll() is None and run_cli(["flwr", "ls", name], coord_env, coord).returncode == 0,
            60,
            f"the SuperLink to serve (log: {link_log})",
        )

        env_node, node_cmd = find(cmds, "python", "-m", "client_app.supernode")
        env_key, key_cmd = find(cmds, "python", "-m", "federation.certs", "node-key")
        nodes, node_homes = [], []
        for i in range(n_nodes + 1):  # the last one is never registered
            site = tmp_path / f"institution-{i}"
            site.mkdir()
            res = run_cli(key_cmd, user_env(group, site / "flwr-home", env_key), site)
            assert res.returncode == 0, res.stderr
            public = site / "node.key.pub"
            if i < n_nodes:
                (coord / "node.key.pub").write_bytes(public.read_bytes())  # sent to the coordinator
                res = run_cli(register, coord_env, coord)
                assert res.returncode == 0 and "registered successfully" in res.stdout, res.stdout + res.stderr
            (site / "ca.crt").write_bytes((coord / "ca.crt").read_bytes())  # received from the coordinator
            cmd = substitute(
                node_cmd,
                {
                    "<coordinator>": "127.0.0.1",
                    "8000": str(port),
                    "<i>": str(i),
                    "<N>": str(n_nodes),
                    "/scratch/spes": str(site / "work"),
                },
            )
            node_homes.append(site / "flwr-home")
            nodes.append(
                group.start(
                    f"supernode-{i}",
                    [*cmd, "--port", str(find_free_port())],
                    user_env(group, node_homes[-1], env_node),
                    site,
                    site / "supernode.log",
                )
            )

        def online():
            res = run_cli(["flwr", "supernode", "list", name, "--format", "json"], coord_env, coord)
            data = json.loads(res.stdout[res.stdout.index("{") :]) if "{" in res.stdout else {}
            return [n["node-id"] for n in data.get("nodes", []) if n.get("status") == "online"]

        wait_for(lambda: len(online()) == n_nodes, 90, f"{n_nodes} SuperNodes online")
        rogue_log = finish(nodes[-1], tmp_path / f"institution-{n_nodes}" / "supernode.log", 60)
        assert nodes[-1].returncode != 0 and "Failed to activate SuperNode" in rogue_log, rogue_log[-2000:]
        assert len(online()) == n_nodes

        (env, run_cmd), (resume_env, resume_cmd) = runs = [c for c in cmds if c[1][:4] == ["flwr", "run", ".", name]]
        documented = [re.search(r"overrides='([^']*)'", " ".join(c[1])).group(1).split() for c in runs]
        assert documented[1] == [*documented[0], "resume=true"]  # the same overrides, plus resume=true
        outputs = tmp_path / "outputs"
        micro = [
            *MICRO_MODEL,
            "model.num_experts=4",
            "strategy.merge.top_k=2",
            f"nodes={n_nodes}",
            "strategy.local_steps=2",
            "run_name=readme",
            f"output_dir={outputs}",
        ]
        run_id, text = readme_run(group, with_overrides(run_cmd, [*micro, "rounds=1"]), home, env, tmp_path / "run.log")
        readme_status(cmds, name, run_id, group, home, text)
        consoles = [text]

        env, log_cmd = find(cmds, "flwr", "log", "<run-id>", name)
        res = run_cli(substitute(log_cmd, {"<run-id>": str(run_id)}), user_env(group, home, env), ROOT)
        assert "held-out loss: " in res.stdout and "tokens trained (all nodes): " in res.stdout, res.stdout[-2000:]

        # Taken one round further with the README's resume command (rounds=2 instead of 1).
        resumed = with_overrides(resume_cmd, [*micro, "rounds=2", "resume=true"])
        run_id, text = readme_run(group, resumed, home, resume_env, tmp_path / "resume.log")
        readme_status(cmds, name, run_id, group, home, text)
        consoles.append(text)
    finally:
        group.stop(grace=10)
    summary = json.loads((outputs / "readme" / "summary.json").read_text())
    assert summary["nodes"] == n_nodes and summary["rounds"] == 2
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert len(json.loads((outputs / "readme" / "run.json").read_text())["resumes"]) == 1
    # Each node ran pinned, kept its state in its own node-config work-dir while a run went on, and
    # removed it when the run completed (the resumed run's nodes were sent the whole model again).
    for i in range(n_nodes):
        node_log = (tmp_path / f"institution-{i}" / "supernode.log").read_text()
        assert f"app pinned to {ROOT}" in node_log  # ... and ran the bundle only because it is this checkout
        assert list((tmp_path / f"institution-{i}" / "work").iterdir()) == []
        assert all(f"partition {i}: removed its run folder, " in text for text in consoles)
    no_runtime_installs(home, *node_homes)


@needs_flower
def test_flwr_run_dot_local_simulation(tmp_path):
    """`flwr run .` on the default local connection, as the README shows it (a fresh FLWR_HOME;
    Flower's local SuperLink on free ports instead of 39091/39093, killed afterwards)."""
    cmds = commands(readme_section("Running on a real federation"))
    env, cmd = find(cmds, "flwr", "run", ".", "--stream")
    assert env == {NO_UV_SYNC: "1"}
    outputs = tmp_path / "outputs"
    cmd = with_overrides(
        cmd,
        [
            *MICRO_MODEL,
            "model.num_experts=4",
            "strategy.merge.top_k=2",
            "nodes=2",
            "rounds=1",
            "strategy.local_steps=2",
            "run_name=sim",
            f"output_dir={outputs}",
        ],
    )
    cmd = [re.sub(r"num-supernodes=\d+", "num-supernodes=2", a) for a in cmd]
    home = tmp_path / "flwr-home"
    home.mkdir()
    # The README's config.toml as written (its federation entry unused here): `flwr run .` with no
    # connection name must still reach the local simulation.
    import tomli_w

    conn_toml = tomllib.loads(fenced(readme_section("Running on a real federation"), "toml")[0])
    (name,) = set(conn_toml["superlink"]) - {"default", "local"}
    conn_toml["superlink"][name] = readme_connection(conn_toml["superlink"][name], 9, tmp_path / "ca.crt")
    (home / "config.toml").write_text(tomli_w.dumps(conn_toml))
    group = ProcessGroup()
    shell = user_env(
        group,
        home,
        {
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(find_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(find_free_port()),
            "SPES_NODE_WORK_DIR": str(tmp_path / "nodes"),
        },
    )
    try:
        for attempt in range(3):
            log = tmp_path / f"flwr-run-{attempt}.log"
            text = finish(group.start("flwr-run", cmd, {**shell, **env}, ROOT, log), log, 420)
            # Flower gives its local SuperLink a fixed 15 s to start, then kills it, possibly in
            # the middle of creating its database; on a busy machine a user deletes that and runs
            # the command again (README), and so do we.
            if "Failed to start local SuperLink" not in text:
                break
            (home / "local-superlink" / "state.db").unlink(missing_ok=True)
        match = RUN_ID.search(text)
        assert match, text[-3000:]
        status = run_status(shell, ROOT, [], int(match.group(1)))
        assert status["status"] == "finished:completed", (status, text[-3000:])
        assert group.alive(), "expected Flower's detached local SuperLink to still run"
    finally:
        group.stop(grace=10)
    assert not group.alive()
    summary = json.loads((outputs / "sim" / "summary.json").read_text())
    assert summary["nodes"] == 2 and summary["rounds"] == 1
    assert (home / "local-superlink" / "state.db").exists()  # the run went through Flower's local SuperLink
    no_runtime_installs(home)
