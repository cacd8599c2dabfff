"""`python -m sim <hydra overrides>`: a SPES run on this machine.

    python -m sim                                   # the demo: 4 nodes, tiny model, a Flower simulation
    python -m sim nodes=4 model=tiny rounds=20 strategy.local_steps=25
    python -m sim engine=inprocess                  # the same run without Flower's runtime (no SuperLink, no Ray)
    python -m sim run_name=demo resume=true         # continue an interrupted run
    python -m sim --print-config model=small        # the composed config, then exit (also: --cfg job)

Every key is listed, with a comment, in conf/config.yaml; presets are picked by group.
The work is done in engine/simulate.py.
"""

import sys

import yaml

from common.errors import ConfigError
from server_app.compose import available_presets, compose, config_groups


def _help() -> str:
    groups = "\n".join(f"    {g}=" + "|".join(available_presets(g)) for g in config_groups())
    return f"{__doc__}\nConfig groups (conf/<group>/<preset>.yaml):\n{groups}\n"


def _config(argv: list[str]) -> dict:
    """The composed config (Hydra only, no torch): a bad override fails here, in about a second."""
    try:
        return compose(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


argv = sys.argv[1:]
if argv[:1] in (["-h"], ["--help"]):
    print(_help())
    sys.exit(0)
if argv[:1] == ["--print-config"] or argv[:2] == ["--cfg", "job"]:
    rest = argv[1:] if argv[0] == "--print-config" else argv[2:]
    print(yaml.safe_dump(_config(rest), sort_keys=False), end="")
    sys.exit(0)
_config(argv)

from engine.simulate import simulate  # noqa: E402 (torch and transformers: only once the config composes)

sys.exit(simulate(argv))
