"""A newcomer without an optional extra gets one line naming the extra to install (exit 2), not
"internal error ... a bug in cvt" (exit 3); an import error that is not a missing extra stays a bug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cvt
from cvt import cli
from cvt.errors import EXTRAS, MissingExtraError, install_hint, missing_extra

# makes `import sklearn` (and its submodules) fail as in an environment without scikit-learn
HIDE = """
import sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Hide())
"""


def cvt_without(tmp_path: Path, hidden: set[str], *args: str) -> subprocess.CompletedProcess:
    """`python -m cvt *args` in a process where the `hidden` packages cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE.format(hidden=sorted(hidden)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(cvt.__file__).resolve().parents[1])])}
    return subprocess.run([sys.executable, "-m", "cvt", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


@pytest.mark.subprocess
def test_the_demo_without_scikit_learn_names_the_extra_and_writes_nothing(tmp_path) -> None:
    done = cvt_without(tmp_path, {"sklearn"}, "demo", "--output-dir", "out")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"cvt: error: this needs the optional package 'sklearn', which is not installed (No module named "
        f"'sklearn'): {install_hint('train')}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_every_optional_package_missing_names_its_extra(monkeypatch, capsys, module) -> None:
    def needs_it(*args, **kwargs):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr("cvt.training.demo.run_demo", needs_it)
    capsys.readouterr()
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"cvt: error: this needs the optional package {module!r}, which is not installed "
                           f"(No module named '{module}'): {install_hint(EXTRAS[module])}")


def test_cvts_own_message_naming_an_extra_keeps_its_words() -> None:
    try:
        try:
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        except ImportError as cause:
            raise ImportError(f"cvt.serve needs Ray Serve: {install_hint('serve')}") from cause
    except ImportError as err:
        mapped = missing_extra(err)
    assert isinstance(mapped, MissingExtraError) and str(mapped) == f"cvt.serve needs Ray Serve: {install_hint('serve')}"


def test_any_other_import_error_is_still_a_bug(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'load_image' from 'cvt.images'", name="cvt.images")

    monkeypatch.setattr("cvt.training.demo.run_demo", broken)
    capsys.readouterr()
    assert cli.main(["demo"]) == 3
    assert "internal error (ImportError): this is a bug in cvt" in capsys.readouterr().err
