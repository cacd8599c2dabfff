"""`python -m client_app.supernode <flower-supernode options>`: a SuperNode that runs only this checkout.

    python -m client_app.supernode --superlink <coordinator>:8000 --root-certificates ca.crt \\
        --auth-supernode-private-key node.key --node-config "partition-id=0 num-partitions=4"

It starts `flower-supernode --isolation process` with the options given and, beside it, Flower's
SuperExec, whose ClientApp processes check every app bundle against the checkout this module
lives in (client_app.app_pin) before installing it: a bundle that differs in any file is
refused, its code never loaded, and the run's coordinator gets an error reply naming the files.
`--pin <dir>` pins another checkout, `--pin off` runs whatever bundle arrives (Flower's default).
`--trust <keys file>` runs instead any bundle signed by one of the federation operator's keys in
that file (`python -m federation.sign`; common.app_bundle): for federations whose operator ships
updates without each institution checking them out.

Stopping it (Ctrl-C, SIGTERM) stops both processes; either one ending ends the other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client_app.app_pin import check_bundle, checkout_files
from common.app_bundle import check_signed_bundle, load_trusted_keys
from common.argv import pop_option

CHECKOUT = Path(__file__).resolve().parent.parent
PIN_ENV = "SPES_APP_PIN"
TRUST_ENV = "SPES_APP_TRUST"
_STOP_GRACE_S = 15.0


def _pin_root(value: str | None) -> Path | None:
    if value == "off":
        return None
    root = CHECKOUT if value is None else Path(value).expanduser().resolve()
    if not (root / "pyproject.toml").is_file():
        raise SystemExit(f"--pin {root}: no pyproject.toml there (give the app's checkout, or --pin off)")
    try:
        files = checkout_files(root)
    except Exception as exc:  # Flower's builder raises ValueError/click errors for an unbuildable app
        raise SystemExit(f"--pin {root}: Flower cannot build an app bundle from it: {exc}") from exc
    print(f"[spes] app pinned to {root} ({len(files)} files): other bundles are refused", flush=True)
    return root


def _trusted(path: str) -> Path:
    trusted = Path(path).expanduser().resolve()
    try:
        keys = load_trusted_keys(trusted)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--trust {path}: {exc}") from exc
    print(f"[spes] running only app bundles signed by one of the {len(keys)} key(s) in {trusted}", flush=True)
    return trusted


def _shim_dir() -> Path:
    """A private folder whose `flwr-clientapp` is this module's checking ClientApp process (the
    SuperExec starts task processes by that name, found on PATH)."""
    folder = Path(tempfile.mkdtemp(prefix="spes-clientapp-"))
    shim = folder / "flwr-clientapp"
    shim.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(CHECKOUT)!r})\n"
        "from client_app.supernode import clientapp_main\nsys.exit(clientapp_main())\n"
    )
    shim.chmod(0o700)
    return folder


def _bundle_check():
    """The check this node's ClientApp processes make of a bundle before installing it."""
    if TRUST_ENV in os.environ:
        keys = load_trusted_keys(Path(os.environ[TRUST_ENV]))
        return lambda fab: print(f"[spes] app bundle signed by {check_signed_bundle(fab, keys)}", flush=True)
    root = Path(os.environ[PIN_ENV])
    expected = checkout_files(root)
    return lambda fab: check_bundle(fab, expected, root)


def clientapp_main() -> int | None:
    """Flower's `flwr-clientapp`, with the bundle checked (pinned checkout or trusted signature) before install."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    check, install = _bundle_check(), runtime.install_from_fab

    def install_if_accepted(fab_content: bytes, *args, **kwargs):
        check(fab_content)  # BundleRefused: Flower replies with it as the task's error
        return install(fab_content, *args, **kwargs)

    runtime.install_from_fab = install_if_accepted
    return flwr_clientapp()


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _flower_exe(name: str) -> str:
    """Flower's executable beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _supervise(node_args: list[str], check_env: dict[str, str]) -> int:
    host, port = pop_option(node_args, "--host", "127.0.0.1")[0], pop_option(node_args, "--port", "9094")[0]
    runtime = f"{host}:{port}"
    node = subprocess.Popen([_flower_exe("flower-supernode"), "--isolation", "process", *node_args])  # noqa: S603
    shims = _shim_dir()
    env = {**os.environ, **check_env, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}
    superexec = [_flower_exe("flower-superexec"), "--runtime-api-address", runtime, "--insecure"]
    executor = subprocess.Popen([*superexec, "--parent-pid", str(node.pid)], env=env)  # noqa: S603
    procs = [node, executor]
    signal.signal(signal.SIGTERM, lambda *_: _stop(procs))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(procs)
        shutil.rmtree(shims, ignore_errors=True)
    return node.returncode or 0


def main(argv: list[str] | None = None) -> int | None:
    args = list(sys.argv[1:] if argv is None else argv)
    pin, node_args = pop_option(args, "--pin")
    trust, node_args = pop_option(node_args, "--trust")
    if "--isolation" in node_args or any(a.startswith("--isolation=") for a in node_args):
        raise SystemExit("--isolation is this command's to set (process, with its own SuperExec); leave it out")
    if trust is not None and pin is not None:
        raise SystemExit("--trust and --pin are two ways to decide what runs here: give one")
    if trust is not None:
        check_env = {TRUST_ENV: str(_trusted(trust))}
    else:
        root = _pin_root(pin)
        check_env = {} if root is None else {PIN_ENV: str(root)}
    if check_env and "--allow-runtime-dependency-installation" in node_args:
        raise SystemExit(
            "--allow-runtime-dependency-installation: a checked node runs the app in the environment `make setup` "
            "made from requirements.lock; Flower's installer would run it in a fresh one of its own making "
            "(leave the flag out, or --pin off)"
        )
    if not check_env:
        return subprocess.call([_flower_exe("flower-supernode"), *node_args])  # noqa: S603
    return _supervise(node_args, check_env)


if __name__ == "__main__":
    sys.exit(main())
