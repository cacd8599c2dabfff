"""`python -m faults`: see faults/cases.py."""

import sys

from faults.cases import main

sys.exit(main(sys.argv[1:]))
