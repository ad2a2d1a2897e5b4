"""Launcher for the SDXL benchmark: `python bench/bench.py --cpu` (see `sdxl.bench` for the options).

The implementation lives in `src/sdxl/bench.py` so that `sdxl bench` and `python -m sdxl.bench` run the same
code; this file only makes the repository's `src/` importable when the package is not installed.
"""

import sys
from pathlib import Path

try:
    import sdxl.bench as bench
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import sdxl.bench as bench

if __name__ == "__main__":
    raise SystemExit(bench.main(sys.argv[1:]))
