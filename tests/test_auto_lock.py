"""auto's lock on a measured choice: a symbolic link planted where the lock goes is removed,
never followed; a process waiting on a stopped one says which lock it waits for and gives up
after a bound; and cvt imports where `fcntl` does not exist (Windows)."""

from __future__ import annotations

import ast
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cvt
from cvt import engines
from cvt.engines import EngineError, auto, build_engine

from conftest import TINY_ARCHITECTURES, randomise_

SIZE = (32, 32)
CPU = torch.device("cpu")


@pytest.fixture
def measuring(monkeypatch) -> list[str]:
    """`auto` measuring, each candidate a torch engine under the runtime's name (exporting the
    runtimes' graphs costs seconds a build; the lock is what is tested); the names built."""
    monkeypatch.setenv("CVT_AUTO_ENGINE", "measure")
    monkeypatch.setattr(auto, "PAUSE_S", 0.0)
    built: list[str] = []
    original = engines._build

    def build(model, name, *args):
        built.append(name)
        engine = original(model, "torch", *args)
        engine.name = name
        return engine

    monkeypatch.setattr(engines, "_build", build)
    return built


def make() -> cvt.CvtForImageClassification:
    return randomise_(cvt.CvtForImageClassification(TINY_ARCHITECTURES["dw_bn-cls_last"].config()), 3).eval()


def lock_path(root: Path, model, batch_size: int) -> Path:
    names = auto.candidates(CPU, model)
    return root / f".{auto.choice_key(model, CPU, SIZE, auto.bucket(batch_size), names)}.lock"


def test_a_symlink_planted_as_the_lock_is_removed_never_followed(tmp_path, measuring, caplog) -> None:
    model, root = make(), tmp_path / "cache"
    root.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's")
    lock_path(root, model, 1).symlink_to(precious)  # an existing file: would be truncated or locked
    nowhere = tmp_path / "created-outside"
    lock_path(root, model, 8).symlink_to(nowhere)  # a dangling link: would create the file
    with caplog.at_level(logging.WARNING, logger="cvt"):
        for batch_size in (1, 8):
            build_engine(model, image_size=SIZE, batch_size=batch_size, cache_dir=root)
    assert precious.read_text() == "the user's" and not nowhere.exists()
    assert sum("is a symbolic link; removed, not followed" in r.getMessage() for r in caplog.records) == 2
    assert not any(path.is_symlink() for path in root.iterdir())
    assert len(list(root.glob("auto-*"))) == 2  # both measured and stored


HOLDER = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.subprocess
def test_a_stopped_first_process_is_waited_for_with_word_then_given_up(tmp_path, measuring, monkeypatch,
                                                                        caplog) -> None:
    """Another process took the lock to measure and was stopped (Ctrl-Z, SIGSTOP): the second
    says which lock it waits for, and after the bound gives up with an error saying what to do."""
    model, root = make(), tmp_path / "cache"
    root.mkdir()
    path = lock_path(root, model, 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(auto, "LOCK_WAIT_S", 1.0)
        with caplog.at_level(logging.INFO, logger="cvt"), \
                pytest.raises(EngineError, match=r"held the lock .* for 1 s .*stopped, or hung.* --engine"):
            build_engine(model, image_size=SIZE, cache_dir=root)
    finally:
        holder.kill()
        holder.wait()
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting and all(path.name in m and "giving up after 1 s" in m for m in waiting)
    assert measuring == []  # nothing was measured while the lock was held
    engine = build_engine(model, image_size=SIZE, cache_dir=root)  # the holder gone, the lock is free
    assert engine.name in measuring


def test_no_module_of_cvt_imports_fcntl() -> None:
    """`fcntl` exists only on POSIX: imported at the top of a module, it stops `cvt.pipeline`
    and `cvt predict` on Windows. Locks go through `filelock`."""
    src = Path(cvt.__file__).resolve().parent
    importers = set()
    for module in src.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "fcntl" in names:
                importers.add(module.relative_to(src).as_posix())
    assert not importers, importers


@pytest.mark.subprocess
def test_the_pipeline_and_the_commands_import_without_fcntl() -> None:
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import cvt.inference, cvt.predict, cvt.engines.export, cvt.engines.auto, cvt.cli\n"
            "print(cvt.pipeline)")
    env = {**os.environ, "PYTHONPATH": str(Path(cvt.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
