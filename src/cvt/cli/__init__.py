"""The `cvt` command line, one module per group of commands:

- `cvt info` and `cvt convert` (`cvt.cli.models`): a model's architecture, parameters and
  multiply-adds; an original microsoft/CvT checkpoint -> a transformers-layout folder;
- `cvt predict` (`cvt.cli.predict`): top-k labels of image files and folders;
- `cvt export` (`cvt.cli.export`): ONNX, OpenVINO IR or TFLite, checked before writing;
- `cvt attention` (`cvt.cli.attention`): what a model attends to, drawn over an image;
- `cvt train`, `cvt eval` and `cvt demo` (`cvt.cli.training`): fine-tune or train, score a
  model on labelled images, and the offline digits demo;
- `cvt serve` (`cvt.cli.serve`): a model as an HTTP service on Ray Serve, with a page;
- `cvt bench` (`cvt.cli.bench`): speed and memory against transformers' CvT.

Building the parser imports no torch: a command imports what it runs (torch, the runtimes,
TensorFlow, transformers) only when it runs, so `cvt --help` and `cvt COMMAND --help` start at
once. Each command is a small function from parsed arguments to an exit status. The error
policy: an expected error (one of cvt's error classes, all derived from `cvt.errors.CvtError`, a
file-system error, or a missing optional package, named with the extra that installs it) is one
line (`cvt: error: ...`), exit status 2; exit status 1 means some inputs failed (the others
were done); anything else is a bug: its traceback, exit status 3. A Ray cluster lost mid-run
(`cvt predict --ray`) is exit status 4, the rows finished before it kept. Ctrl-C is exit status 130. `cvt --debug ...` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import ClusterLostError, CvtError, missing_extra, short
from . import attention, bench, export, models, predict, serve, training
from .common import UsageError, check_sizes, progress_bars_on_a_terminal_only, stdout_writes_any_text

__all__ = ["EXPECTED_ERRORS", "UsageError", "build_parser", "entry", "main"]

# errors that say what the user (or their files, disk or network) must fix: one line, exit 2
EXPECTED_ERRORS = (CvtError, OSError)
EXIT_INPUTS_FAILED, EXIT_ERROR, EXIT_BUG, EXIT_CLUSTER_LOST, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def build_parser() -> argparse.ArgumentParser:
    """The whole `cvt` parser, every command and option (the documentation's CLI reference is
    generated from it)."""
    parser = argparse.ArgumentParser(prog="cvt", description="CvT image models: inspect, convert, "
                                     "classify, train, export, benchmark.")
    parser.add_argument("--version", action="version", version=f"cvt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, training, predict, serve, export, attention, bench):  # the order --help lists
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring for the error policy)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_sizes(args)
        with stdout_writes_any_text(), progress_bars_on_a_terminal_only():
            return args.run(args)
    except KeyboardInterrupt as err:
        print(f"cvt: interrupted{f' {err}' if str(err) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterLostError as err:
        if args.debug:
            traceback.print_exc()
        print(f"cvt: error: {err}", file=sys.stderr)
        return EXIT_CLUSTER_LOST
    except Exception as err:
        if isinstance(err, ImportError):
            err = missing_extra(err) or err
        expected = isinstance(err, EXPECTED_ERRORS)
        if args.debug or not expected:
            traceback.print_exc()
        if expected:
            print(f"cvt: error: {_message(err)}", file=sys.stderr)
            return EXIT_ERROR
        print(f"cvt: internal error ({type(err).__name__}): this is a bug in cvt; please report it "
              f"with the traceback above", file=sys.stderr)
        return EXIT_BUG


def _message(err: Exception) -> str:
    """An expected error's line; a file-system error's file names shortened (a 10,000-character
    name would make a 10,000-character line)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        names = [short(n) for n in (err.filename, err.filename2) if n is not None]
        return f"{err.strerror}: {' -> '.join(names)}"
    return str(err)


def entry() -> None:
    """The `cvt` command (and `python -m cvt`): `main`'s status as the process's. On Ctrl-C the
    process ends at once, not waiting for a thread blocked reading a slow file (nor, when a Ray
    cluster was lost, for Ray's shutdown, which would wait for it)."""
    status = main()
    if status in (EXIT_INTERRUPTED, EXIT_CLUSTER_LOST):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    # torch's and transformers' millions of objects live until the process ends: frozen, the
    # interpreter's last garbage collections pass over them (about 0.6 s of every command's exit)
    gc.freeze()
    sys.exit(status)
