#!/usr/bin/env python
"""`python scripts/report.py PATH [options]`: the same as `sparsebench report PATH [options]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sparsebench.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
