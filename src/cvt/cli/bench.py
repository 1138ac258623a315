"""`cvt bench`: speed and memory of this library's CvT against transformers' on the same weights
(the harness, `cvt.bench`, and transformers load only when it runs)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="speed and memory of every engine against transformers' CvT",
                           description="Side-by-side benchmark of this library's CvT against "
                           "transformers' on the same weights (see cvt.bench for the method). "
                           'Needs pip install "cvt-vision[bench]".')
    bench.add_argument("--case", action="append", metavar="NAME",
                       help="run only this case of cvt.bench.CASES, e.g. 'CvT-13 224 b1' "
                            "(repeatable; default: all)")
    bench.add_argument("--rounds", type=int, help="timed rounds per case (default: per case)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    bench.add_argument("--no-engines", action="store_true",
                       help="time only transformers and the plain model (no engine builds)")
    bench.add_argument("--json", help="also write the results, with the CPU, date and commit, to this JSON file "
                       "(benchmarks/results/NAME.json is what the docs quote)")
    bench.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one memory measurement
    bench.add_argument("--side", help=argparse.SUPPRESS)
    bench.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench

    return bench.run_command(args)
