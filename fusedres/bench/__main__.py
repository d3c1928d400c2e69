"""Entry point of `python -m fusedres.bench` and the `fusedres-bench` script (see cli.py)."""

import sys

from fusedres.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
