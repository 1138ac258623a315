"""The command line starts at once: `cvt --help`, `cvt COMMAND --help` and `cvt --version` build
the whole parser without importing torch (or TensorFlow, transformers, the runtimes), and so does
`import cvt`, whose names load on first use. Each runs in a fresh interpreter, since this one has
torch loaded already."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cvt
from cvt.cli import build_parser

pytestmark = pytest.mark.subprocess

HEAVY = ("torch", "tensorflow", "keras", "transformers", "onnxruntime", "openvino")

# runs `cvt ARGS...` as the entry point does, then reports which heavy modules it loaded
PROBE = f"""
import sys
from cvt.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
print("status", status or 0)
print("loaded", *sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def run_fresh(code: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def commands() -> list[str]:
    return list(next(a for a in build_parser()._actions if a.dest == "command").choices)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["predict", "--help"]]
                         + [[name, "--help"] for name in ("info", "train", "export", "bench")])
def test_help_and_version_load_no_torch(args):
    lines = run_fresh(PROBE, *args)
    assert lines[-2:] == ["status 0", "loaded"], lines[-2:]
    if args == ["--version"]:
        assert lines[0] == f"cvt {cvt.__version__}"
    else:
        assert lines[0].startswith(f"usage: cvt {args[0] if args != ['--help'] else ''}".rstrip())


def test_every_command_helps_without_torch():
    """Every command, including any added later, has a --help that loads none of them."""
    script = PROBE.replace("status = main(sys.argv[1:])", "status = [main([c, '--help']) for c in sys.argv[1:]]")
    assert run_fresh(script, *commands())[-1] == "loaded"


def test_import_cvt_is_light_and_names_load_on_first_use():
    code = f"""
import sys
import cvt
print(*sorted(m for m in {HEAVY!r} if m in sys.modules))
print("CvtModel" in dir(cvt), "load" in dir(cvt))
from cvt import CvtModel, load
print(CvtModel.__module__, load.__module__, "torch" in sys.modules)
"""
    assert run_fresh(code) == ["", "True True", "cvt.modeling cvt.modeling.factory True"]


def test_the_package_docstring_names_every_command():
    import cvt.cli

    assert [c for c in commands() if f"`cvt {c}`" not in cvt.cli.__doc__] == []
