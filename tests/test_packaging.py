"""The distribution users install: its name everywhere an install line or hint names it, and a
built wheel that works outside the checkout (entry point, package data)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

import cvt
from cvt.errors import DISTRIBUTION, install_hint


def project_name() -> str:
    """The distribution name as pyproject.toml declares it (the one fact every hint must use)."""
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^name\s*=\s*"([^"]+)"', project, re.M).group(1)


def texts_users_read() -> list[Path]:
    """Every file whose words reach a user: the README and docs pages, and cvt's source (its
    messages and docstrings)."""
    files = [REPO_ROOT / "README.md", *REPO_ROOT.glob("*.md"), *REPO_ROOT.glob("docs/**/*.md"),
             *REPO_ROOT.glob("benchmarks/*.md"), *REPO_ROOT.glob("src/cvt/**/*.py")]
    return sorted(set(files))


# `cvt` as a requirement: alone or with extras, quoted or not, but not a path, option or longer name
OUR_REQUIREMENT = re.compile(r"""(?<![\w./-])["']?(cvt(?:[-_][\w-]+)?)(\[[\w,\s-]*\])?["']?(?![\w./-])""")


def misnamed_installs(text: str, name: str) -> list[str]:
    """The lines of `text` that install (or name, with extras) a `cvt...` requirement other than
    `name`: `pip install cvt`, `"cvt[tf]"`, `cvt-other`."""
    bad = []
    for line in text.splitlines():
        extras_of_plain_cvt = re.search(r"(?<![\w-])cvt\[", line)
        commands = [command.split(" #")[0] for command in re.findall(r"pip install([^`\n]*)", line)]
        installs = [m.group(1) for command in commands
                    for m in OUR_REQUIREMENT.finditer(command)]
        if extras_of_plain_cvt or any(requirement != name for requirement in installs):
            bad.append(line.strip())
    return bad


def test_the_distribution_name_is_the_one_in_pyproject():
    assert DISTRIBUTION == project_name() == "cvt-vision"
    assert install_hint() == f"pip install {DISTRIBUTION}"
    assert install_hint("tf") == f'pip install "{DISTRIBUTION}[tf]"'


@pytest.mark.parametrize("line", [
    "pip install cvt", 'pip install "cvt[tf]"', "  pip install -U cvt[openvino] torch",
    "needs `cvt[export]`", "pip install 'cvt[onnxruntime]'"])
def test_the_install_line_check_catches_the_other_project(line):
    assert misnamed_installs(line, "cvt-vision") == [line.strip()]


@pytest.mark.parametrize("line", [
    "pip install cvt-vision", 'pip install "cvt-vision[tf]"', 'pip install -e ".[dev]"',
    "pip install torch --index-url https://download.pytorch.org/whl/cpu", "cvt predict cvt-13 x.jpg",
    "pip install -e .", "python -m cvt info cvt-13", "pip install cvt-vision  # the cvt command"])
def test_the_install_line_check_passes_ours(line):
    assert misnamed_installs(line, "cvt-vision") == []


def test_every_install_line_and_hint_names_the_distribution():
    name = project_name()
    found = {str(path.relative_to(REPO_ROOT)): misnamed_installs(path.read_text(encoding="utf-8"), name)
             for path in texts_users_read()}
    assert {path: lines for path, lines in found.items() if lines} == {}
    assert len(found) > 20  # the README, the pages and the modules were all read


def test_version_is_the_distributions():
    import importlib.metadata

    assert cvt.__version__ == importlib.metadata.version(project_name())
    shown = subprocess.run([sys.executable, "-m", "cvt", "--version"], capture_output=True, text=True,
                           check=True).stdout
    assert shown.split() == ["cvt", cvt.__version__]


def copy_project(to: Path) -> Path:
    """What a build reads (pyproject, README, src), without caches or this checkout's egg-info, so
    the build writes nothing into the checkout."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, to / name)
    shutil.copytree(REPO_ROOT / "src", to / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return to


def reach_installed_packages(venv: Path) -> None:
    """Let `venv` import the packages this test runs with (torch, numpy, ...) but no other cvt:
    a .pth file listing this interpreter's import folders, whichever way it was installed (a
    venv's --system-site-packages would see the base interpreter's, not this venv's). The venv's
    own site-packages, where the wheel goes, comes first; a folder holding a `cvt` package (the
    checkout, an editable install) is left out, and the .pth files in the listed folders are not
    run, so an editable install's finder is not either."""
    stdlib = {Path(sysconfig.get_path(name)).resolve() for name in ("stdlib", "platstdlib")}  # the venv's too
    folders = [Path(p).resolve() for p in sys.path if p and Path(p).is_dir()]
    listed = [str(p) for p in dict.fromkeys(folders) if p not in stdlib and not p.is_relative_to(REPO_ROOT.resolve())
              and not (p / "cvt" / "__init__.py").exists()]
    site_packages, = Path(venv / "lib").glob("python3*/site-packages")
    (site_packages / "installed-packages.pth").write_text("\n".join(listed) + "\n", encoding="utf-8")


@pytest.mark.slow
@pytest.mark.subprocess
def test_built_wheel_works_in_a_fresh_venv(tmp_path):
    (tmp_path / "project").mkdir()
    project = copy_project(tmp_path / "project")
    dist = tmp_path / "dist"
    # --no-isolation: the build backend (setuptools) is the installed one, so nothing is downloaded
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                    "--outdir", str(dist), str(project)], check=True, capture_output=True)
    wheel, = dist.glob("cvt_vision-*.whl")
    sdist, = dist.glob("cvt_vision-*.tar.gz")
    assert sdist.stat().st_size > 0
    names = zipfile.ZipFile(wheel).namelist()
    assert "cvt/imagenet_1k_labels.txt" in names
    assert {f"cvt/serve/page/{name}" for name in ("index.html", "app.js", "style.css")} <= set(names)  # cvt serve's page

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    reach_installed_packages(venv)
    # --ignore-installed: a cvt-vision installed where those packages are stays where it is
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index",
                    "--ignore-installed", "--quiet", str(wheel)], check=True, capture_output=True)

    # the venv alone decides what `import cvt` finds (a PYTHONPATH to a checkout would win)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> str:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run(bin_dir / "cvt", "--version").split() == ["cvt", cvt.__version__]
    info = run(bin_dir / "cvt", "info", "cvt-13")
    assert "parameters: 19,997,480" in info
    where, labels = run(bin_dir / "python", "-c",
                        "import cvt; m = cvt.create_model('cvt-13'); "
                        "print(cvt.__file__); print(len(m.config.id2label))").split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(REPO_ROOT.resolve())
    assert labels == "1000"
