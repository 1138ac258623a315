"""Ours vs transformers' CvT, side by side in one process: `python benchmarks/bench.py [--case ...]`.

The same as `cvt bench`; see `cvt.bench` for the method and benchmarks/README.md for results.
"""

import sys

from cvt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
