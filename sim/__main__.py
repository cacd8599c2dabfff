"""`python -m sim <hydra overrides>`: a SPES run on this machine.

    python -m sim                                   # the demo: 4 nodes, tiny model, a Flower simulation
    python -m sim nodes=4 model=tiny rounds=20 strategy.local_steps=25
    python -m sim engine=inprocess                  # the same run without Flower's runtime (no SuperLink, no Ray)
    python -m sim run_name=demo resume=true         # continue an interrupted run

Config keys and presets: conf/config.yaml, conf/model/*.yaml, conf/strategy/*.yaml, conf/recipe/*.yaml.
The work is done in engine/simulate.py.
"""

import sys

if sys.argv[1:2] in (["-h"], ["--help"]):
    print(__doc__)
    sys.exit(0)

from engine.simulate import simulate  # noqa: E402 (the help above needs no torch)

sys.exit(simulate(sys.argv[1:]))
