"""`python -m evaluation <checkpoint>`: see evaluation/checkpoint_eval.py."""

import sys

from evaluation.checkpoint_eval import main

sys.exit(main(sys.argv[1:]))
