"""Resuming a training run safely: every `cvt train` option is either compared with the saved run
(a difference is refused, naming both values, before anything changes) or result-neutral; a
damaged state is a clear error; interrupted writes leave nothing behind that blocks the run; a run
that never saved starts again in place; data of one class is refused."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from cvt import cli
from cvt.training import TrainOptions, train
from cvt.training.folder import LOCK_NAME, RECORD_NAME
from cvt.training.state import STATE_NAME, StateWriteError, load_state, save_state
from cvt.training.trainer import RESUME_COMPARED, RESUME_NEUTRAL

from conftest import as_args, assert_close_to_scale, make_folder, make_model_folder, read_metrics, read_weights, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_options() -> list[str]:
    """Every option of `cvt train`, read from the parser itself."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return [a.dest for a in sub.choices["train"]._actions if a.dest != "help"]


def renamed_class_data(tmp_path: Path, data: Path) -> Path:
    copy = tmp_path / "renamed"
    shutil.copytree(data, copy)
    (copy / "cat").rename(copy / "cow")
    return copy


# Every compared option: (another value for it, the identity entry the refusal names)
CHANGES = {
    "model": (lambda tmp, o: make_model_folder(tmp / "deeper", tiny_config(num_labels=3, depth=(1, 1, 2))),
              "model.depth"),
    "data": (lambda tmp, o: renamed_class_data(tmp, o["data"]), "classes"),
    "val_data": (lambda tmp, o: make_folder(tmp / "val", per_class=2, seed=1), "val_images"),
    "val_split": (0.25, "val_split"), "recipe": ("paper", "recipe"), "epochs": (3, "epochs"),
    "batch_size": (6, "batch_size"), "lr": (2e-3, "lr"), "weight_decay": (0.01, "weight_decay"),
    "warmup_epochs": (0.5, "warmup_epochs"), "label_smoothing": (0.2, "label_smoothing"),
    "hflip": (0.0, "hflip"), "mixup": (0.2, "mixup"), "cutmix": (0.3, "cutmix"),
    "clip_grad": (2.0, "clip_grad"), "ema_decay": (0.9, "ema_decay"), "image_size": (48, "image_size"),
    "accum_steps": (2, "accum_steps"), "precision": ("bf16", "precision"),
    "freeze_backbone": (True, "freeze_backbone"), "seed": (1, "seed"),
    # sync_bn needs GPUs (refused on CPU before any resume): its saved value is changed instead
}


def test_every_train_option_is_compared_on_resume_or_result_neutral() -> None:
    """A new `cvt train` option fails here until it is classified."""
    options = train_options()
    assert set(options) == RESUME_COMPARED | RESUME_NEUTRAL.keys()
    assert not RESUME_COMPARED & RESUME_NEUTRAL.keys()
    assert set(options) == set(TrainOptions.__dataclass_fields__)
    assert set(CHANGES) | {"sync_bn"} == RESUME_COMPARED


@pytest.mark.slow
def test_resume_with_any_other_result_changing_setting_is_refused_naming_both_values(paused, capsys):
    options, tmp_path = paused
    state_path = options["output_dir"] / STATE_NAME
    state_bytes, metrics = state_path.read_bytes(), (options["output_dir"] / "metrics.jsonl").read_text()
    for name, (value, entry) in CHANGES.items():
        changed = {**options, name: value(tmp_path, options) if callable(value) else value}
        capsys.readouterr()
        assert cli.main([*as_args(changed), "--resume"]) == 2, name
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("cvt: error: cannot resume"), err
        assert f"{entry}: saved run " in last and ", this command " in last, (name, err)
        assert state_path.read_bytes() == state_bytes, name  # nothing changed on disk
        assert (options["output_dir"] / "metrics.jsonl").read_text() == metrics, name
    # the values themselves are named
    assert cli.main([*as_args({**options, "lr": 2e-3}), "--resume"]) == 2
    assert "lr: saved run 0.001, this command 0.002" in capsys.readouterr().err
    assert cli.main([*as_args({**options, "data": tmp_path / "renamed"}), "--resume"]) == 2
    assert "'cat'" in capsys.readouterr().err

    # sync_bn (GPU only): a state saved with it is refused without it
    state = load_state(state_path)
    state["run"]["sync_bn"] = True
    save_state(state_path, state)
    assert cli.main([*as_args(options), "--resume"]) == 2
    assert "sync_bn: saved run True, this command False" in capsys.readouterr().err
    # a state from an earlier cvt, which did not record the class list, cannot be checked
    del state["run"]["sync_bn"], state["run"]["classes"]
    save_state(state_path, state)
    assert cli.main([*as_args(options), "--resume"]) == 2
    assert "settings the saved run did not record (saved by an earlier cvt?): classes, sync_bn" in (
        capsys.readouterr().err)
    state["run"].update(sync_bn=False, classes=["ant", "bee", "cat"])
    save_state(state_path, state)

    # result-neutral options may differ; the run continues to the end
    neutral = {**options, "from_scratch": True, "grad_checkpointing": True, "save_every": 100}
    assert cli.main([*as_args(neutral), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(options["output_dir"]) if "loss" in r] == list(range(1, 7))


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("rng"), "'rng' part is missing"),
    (lambda s: s.pop("optimizer"), "'optimizer' part is missing"),
    (lambda s: s.update(step="4"), "'step' part is a str, not a int"),
    (lambda s: s["rng"][0].pop("numpy"), "'rng' part does not hold a random state"),
    (lambda s: s.update(rng=[]), "'rng' part does not hold a random state"),
    (lambda s: s["model"].update({"classifier.weight": torch.zeros(7, 2)}), "'model' part does not fit"),
    (lambda s: s["optimizer"]["param_groups"].pop(), "'optimizer' part does not fit"),
])
def test_missing_or_malformed_state_parts_are_clear_errors(paused, capsys, damage, named):
    options, _ = paused
    state_path = options["output_dir"] / STATE_NAME
    state = load_state(state_path)
    damage(state)
    save_state(state_path, state)
    damaged = state_path.read_bytes()
    capsys.readouterr()
    assert cli.main([*as_args(options), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and named in err and f"cannot resume from {state_path}" in err, err
    assert state_path.read_bytes() == damaged


def test_failed_save_keeps_the_previous_state_and_leftovers_are_removed(paused, monkeypatch, capsys):
    """A save that fails half-way through (disk full) leaves the last good state, which resumes
    to the same weights as a run never interrupted; temporary files a kill -9 would leave behind
    are removed when the run resumes."""
    options, tmp_path = paused
    out = options["output_dir"]
    good = out / STATE_NAME
    good_bytes = good.read_bytes()

    def dying_save(obj, f):  # writes half a state, then the disk is full
        f.write(good_bytes[: len(good_bytes) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cvt.training.state.torch.save", dying_save)
    with pytest.raises(StateWriteError, match="No space left on device.*previous state .* is intact"):
        train(TrainOptions(**options, resume=True, save_every=1))
    monkeypatch.undo()
    assert good.read_bytes() == good_bytes and load_state(good)["step"] == 1
    assert not list(out.glob(".*.tmp"))  # the failed write cleaned up after itself

    # what a kill -9 in the middle of writes leaves: temporary files beside the targets
    leftovers = [out / f".{STATE_NAME}.0123456789abcdef.tmp", out / "last" / ".model.safetensors.0badc0de.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(good_bytes[:100])
    assert cli.main([*as_args(options), "--resume"]) == 0
    assert not any(p.exists() for p in leftovers)

    whole = {**options, "output_dir": tmp_path / "whole"}
    assert cli.main(as_args(whole)) == 0
    a, b = read_weights(out / "last"), read_weights(tmp_path / "whole" / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert_close_to_scale(a[key], b[key], rel=1e-5, msg=key)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 7))


def test_a_run_killed_before_its_first_save_starts_again_in_place(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / "data", per_class=4)
    make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    options = dict(model=tmp_path / "start", data=data, output_dir=tmp_path / "run", epochs=1,
                   batch_size=4, lr=1e-3, val_split=0, workers=0)

    def killed(obj, path):
        raise KeyboardInterrupt  # the process dies in its first save
    monkeypatch.setattr("cvt.training.state.torch.save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(**options, save_every=1))
    monkeypatch.undo()
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / STATE_NAME).exists()
    (tmp_path / "run" / f".{STATE_NAME}.feedface.tmp").write_bytes(b"half")  # as kill -9 leaves

    capsys.readouterr()
    assert cli.main([*as_args(options), "--resume"]) == 2
    assert "stopped before its first saved state; start it again without --resume" in capsys.readouterr().err
    assert cli.main(as_args(options)) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    # no temporary file is left; the lock file and its record (a cvt run started there) stay
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == [RECORD_NAME, LOCK_NAME]
    # once it has a state, starting over is refused again (nothing is clobbered)
    assert cli.main(as_args(options)) == 2 and "already holds a training run" in capsys.readouterr().err


def test_training_data_of_one_class_is_refused(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=("ant",), per_class=6)
    make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    options = dict(model=tmp_path / "start", data=data, output_dir=tmp_path / "run", epochs=1,
                   batch_size=2, val_split=0, workers=0)
    assert cli.main(as_args(options)) == 2
    err = capsys.readouterr().err
    assert "training needs at least two classes, this data has 1 (ant)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
