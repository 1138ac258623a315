"""A training run's folder and state are the user's to keep: a run's metrics are never deleted
once it saved a state, the folder's lock follows no planted link and needs no Unix-only module,
a launcher's variables that no launcher set are an error, a state of an unknown format is
refused, a torn last line of metrics.jsonl is dropped with a warning, and a full disk while
saving says the previous state is intact."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cvt
from cvt import cli
from cvt.training.distributed import launch_environment
from cvt.training.folder import LOCK_NAME, RECORD_NAME
from cvt.training.state import (STATE_FORMAT, STATE_NAME, ResumeError, StateWriteError, load_state, rng_state,
                               save_state)

from conftest import as_args, one_line_error, save_tiny_classifier, tiny_training_args, write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ files cvt did not write
def test_a_finished_run_whose_state_is_gone_keeps_its_metrics_and_models(tmp_path, capsys) -> None:
    """A run that saved a state is not a killed run's leftovers: with its state file deleted, the
    same command is refused and its metrics and models are left exactly as they were."""
    out = tmp_path / "run"
    args = tiny_training_args(tmp_path, out)
    assert cli.main(args) == 0
    (out / STATE_NAME).unlink()  # to save space, or by mistake
    kept = {path: path.read_bytes() for path in [out / "metrics.jsonl", *(out / "last").iterdir()]}

    line = one_line_error(capsys, args)
    assert "of a run that saved a training state, but its training_state.pt is missing" in line
    assert "metrics.jsonl" in line and "last" in line
    assert {path: path.read_bytes() for path in kept} == kept


# ------------------------------------------------------------------------------ the folder's lock
def test_a_planted_link_as_the_lock_file_is_refused_and_nothing_outside_is_touched(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (out / LOCK_NAME).symlink_to(victim)
    line = one_line_error(capsys, tiny_training_args(tmp_path, out))
    assert f"{LOCK_NAME} is a symbolic link" in line and "does not follow it" in line
    assert victim.read_text() == "the user's file"

    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(tmp_path / "elsewhere.lock")  # a dangling link: nothing may be created
    one_line_error(capsys, tiny_training_args(tmp_path, out))
    assert not (tmp_path / "elsewhere.lock").exists()
    assert not (out / "metrics.jsonl").exists()


def test_a_planted_link_as_the_record_is_replaced_not_followed(tmp_path) -> None:
    """The record beside the lock is written by renaming a new file over it (the link itself is
    replaced) and read only as a small regular file (a link to /dev/zero would never end)."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (out / RECORD_NAME).symlink_to(victim)
    assert cli.main(tiny_training_args(tmp_path, out)) == 0
    assert victim.read_text() == "the user's file"
    record = out / RECORD_NAME
    assert not record.is_symlink() and json.loads(record.read_text())["started"] is True

    other = tmp_path / "other"
    other.mkdir()
    (other / RECORD_NAME).symlink_to("/dev/zero")
    assert cli.main(tiny_training_args(tmp_path, other)) == 0


HOLDER = """
import sys, time
from pathlib import Path
from cvt.training.folder import lock_run_folder
folder = lock_run_folder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.subprocess
def test_a_run_locked_by_another_process_is_refused_at_once_naming_it(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(cvt.__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(capsys, tiny_training_args(tmp_path, out))
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by another training run (process {holder.pid} on" in line
    assert not (out / "metrics.jsonl").exists()
    assert cli.main(tiny_training_args(tmp_path, out)) == 0  # the holder is gone: its lock went with it


def test_the_folder_lock_needs_no_unix_only_module(tmp_path, monkeypatch) -> None:
    """Windows has no fcntl: the module that locks run folders imports and locks without it."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` now fails, as on Windows
    monkeypatch.delitem(sys.modules, "cvt.training.folder")
    folder = importlib.import_module("cvt.training.folder")
    held = folder.lock_run_folder(tmp_path / "run")
    try:
        with pytest.raises(ResumeError, match="in use by another training run"):
            folder.lock_run_folder(tmp_path / "run")
    finally:
        held.release()


# ------------------------------------------------------------------------------ launcher variables
@pytest.mark.parametrize("env, named", [
    ({"RANK": "1"}, "RANK=1 (rank 1 is outside a world of 1 process)"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "rank 3 is outside a world of 2 processes"),
    ({"WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set: no launcher started this process"),
    ({"RANK": "one"}, "RANK='one' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "a world of no processes"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number"),
])
def test_launcher_variables_no_launcher_set_or_malformed_are_an_error(tmp_path, capsys, monkeypatch, env,
                                                                       named) -> None:
    """`RANK=1` left in a shell made `cvt eval` a silent non-main process: nothing printed, exit 0."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = save_tiny_classifier(tmp_path / "model")
    data = write_images(tmp_path / "images", count=5)
    line = one_line_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--workers", "0"])
    assert named in line and "torchrun" in line
    assert capsys.readouterr().out == ""


def test_a_launchers_variables_are_read_as_it_set_them(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert launch_environment() == (0, 1, 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_environment() == (0, 1, 0)  # what a one-process launcher sets
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert launch_environment() == (1, 2, 1)  # torchrun's second process


# ------------------------------------------------------------------------------ states and metrics
def minimal_state(**changes) -> dict:
    return {"step": 1, "best_top1": 0.5, "run": {}, "rng": [rng_state()], "extra_epochs": 0, "model": {},
            "optimizer": {}, "scaler": None, "ema": None, **changes}


@pytest.mark.parametrize("version", [-1, 0, 1.5, "1"])
def test_a_state_format_no_cvt_writes_is_refused(tmp_path, version) -> None:
    path = tmp_path / STATE_NAME
    torch.save({**minimal_state(), "format": version, "cvt_version": "0.1.0"}, path)
    with pytest.raises(ResumeError, match=f"its state format {version!r} is not one any cvt writes"):
        load_state(path)
    torch.save({**minimal_state(), "format": STATE_FORMAT, "cvt_version": "0.1.0"}, path)
    assert load_state(path)["step"] == 1


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(paused, capsys) -> None:
    """A crash mid-write leaves half a line at the end of metrics.jsonl: --resume drops it with a
    warning and the run goes on; its records are whole again."""
    options, _ = paused
    metrics = options["output_dir"] / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "epoch": 1, "lo')
    capsys.readouterr()
    assert cli.main([*as_args(options), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl: its last line is not a whole record" in err and "Traceback" not in err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))


def test_a_bad_metrics_line_before_the_last_is_a_clear_error(paused, capsys) -> None:
    options, _ = paused
    metrics = options["output_dir"] / "metrics.jsonl"
    metrics.write_text("[1, 2]\n" + metrics.read_text())  # JSON, but no record of a run
    before = metrics.read_bytes()
    line = one_line_error(capsys, [*as_args(options), "--resume"])
    assert "metrics.jsonl: line 1 is not a JSON record of a training run" in line
    assert metrics.read_bytes() == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="simulates a full disk with Linux's /dev/full")
def test_a_full_disk_while_saving_says_the_previous_state_is_intact(paused, capsys, monkeypatch) -> None:
    """Every write of a state goes to /dev/full (ENOSPC, as a full disk answers), the way torch
    writes it: a one-line error (it was exit 3, torch's RuntimeError), and the old state resumes."""
    options, _ = paused
    state = options["output_dir"] / STATE_NAME
    before = state.read_bytes()
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return real_save(obj, "/dev/full", *args, **kwargs)
        with open("/dev/full", "wb") as full:
            return real_save(obj, full, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    line = one_line_error(capsys, [*as_args(options), "--resume", "--save-every", "1"])
    monkeypatch.undo()
    assert "could not save the training state at step 2 (No space left on device)" in line
    assert f"the previous state in {state} is intact: free some space, then continue with --resume" in line
    assert state.read_bytes() == before and not list(options["output_dir"].glob(".*.tmp"))
    assert cli.main([*as_args(options), "--resume"]) == 0


def test_a_full_disk_on_the_first_save_says_nothing_was_saved(tmp_path, monkeypatch) -> None:
    def full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StateWriteError, match=r"\(No space left on device\); no earlier state was saved"):
        save_state(tmp_path / STATE_NAME, minimal_state())
    assert list(tmp_path.iterdir()) == []
