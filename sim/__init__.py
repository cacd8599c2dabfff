"""`python -m sim`: the command that runs SPES on this machine (engine/simulate.py does the work)."""
