"""The command line starts at once: `cvt --help`, `cvt COMMAND --help` and `cvt --version` build
the whole parser without importing torch (or TensorFlow, transformers, the runtimes), and so does
`import cvt`, whose names load on first use. Each runs in a fresh interpreter, since this one has
torch loaded already."""

from __future__ import annotations

import os
import subprocess
import sys

from pathlib import Path

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


def test_moved_modules_keep_their_old_paths_for_one_release_with_a_warning():
    code = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import cvt.weights
    from cvt.weights import load_pretrained, read_config
    import cvt.weights
from cvt.checkpoints import load, read
print(*[f"{w.category.__name__}: {w.message}" for w in caught], sep="\\n")
print(load_pretrained is load.load_pretrained, read_config is read.read_config)
"""
    assert run_fresh(code) == [
        "DeprecationWarning: cvt.weights moved to cvt.checkpoints.read, cvt.checkpoints.check, "
        "cvt.checkpoints.load, cvt.checkpoints.write; the old path goes in the next release",
        "True True"]


def test_every_moved_module_names_homes_that_exist():
    import importlib.util

    missing = [(old, home) for old, homes in cvt._MOVED.items() for home in homes
               if importlib.util.find_spec(f"cvt.{home}") is None]
    assert missing == []
    # each old path is one file of _moved/, and every file there is an old path
    moved = Path(cvt.__file__).with_name("_moved")
    assert {p.stem for p in moved.glob("*.py")} == set(cvt._MOVED)
    assert all(Path(importlib.util.find_spec(f"cvt.{old}").origin).parent == moved for old in cvt._MOVED)


def test_the_public_module_paths_import_without_a_deprecation():
    """`cvt.modeling` (transformers-style), `from cvt.ray import CvtPredictor` and Ray Serve's
    `cvt.serve:NAME` are the packages themselves, not old paths."""
    code = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from cvt.modeling import CvtLayer, CvtModel
    from cvt.ray import CvtPredictor
    import cvt.serve
    cvt.serve.OVERLAY_SIZE
print(*[w.message for w in caught if str(w.message).startswith("cvt.")], sep="\\n")
print(CvtPredictor.__module__, cvt.serve.Settings.__module__)
"""
    assert run_fresh(code) == ["", "cvt.ray cvt.serve.deployment"]
