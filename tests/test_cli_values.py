"""Numbers the command line takes are checked where they are parsed: 0 images, a NaN rate or a
probability of 7 is argparse's one-line error (exit 2), never a traceback mid-run; the library
refuses them too. Sizes that cost memory are bounded by what they cost: a fixed export batch,
an opset torch cannot write, the attention picture."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cvt
from cvt import cli
from cvt.engines import export
from cvt.constants import EXPORT_BATCH_RANGE, PICTURE_SIZE_RANGE
from cvt.errors import InvalidValueError
from cvt.training import TrainOptions, train
from cvt.training.recipes import BOUNDS, get_recipe

from conftest import save_tiny_classifier, tiny_config

TRAIN = ["train", "--model", "m", "--data", "d", "--output-dir", "o"]


def argparse_error(capsys, argv: list[str]) -> str:
    """`cvt argv` refused by argparse: exit status 2, and the message's last line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("option, value, allowed", [
    ("--batch-size", "0", "a whole number from 1 up"), ("--lr", "nan", "a number above 0"),
    ("--lr", "0", "a number above 0"), ("--warmup-epochs", "nan", "a number from 0 up"),
    ("--hflip", "7", "a number from 0 to 1"), ("--label-smoothing", "2", "a number from 0, below 1"),
    ("--mixup", "-1", "a number from 0 up"), ("--cutmix", "inf", "a number from 0 up"),
    ("--epochs", "0", "a whole number from 1 up"), ("--epochs", "-2", "a whole number from 1 up"),
    ("--weight-decay", "-0.1", "a number from 0 up"), ("--clip-grad", "0", "a number above 0"),
    ("--ema-decay", "1", "a number from 0, below 1"), ("--val-split", "1", "a number from 0, below 1"),
    ("--accum-steps", "0", "a whole number from 1 up"), ("--workers", "-1", "a whole number from 0 up"),
    ("--save-every", "0", "a whole number from 1 up"), ("--stop-at-step", "0", "a whole number from 1 up"),
    ("--extend-epochs", "0", "a whole number from 1 up"), ("--batch-size", "2.5", "a whole number from 1 up"),
])
def test_train_refuses_numbers_outside_their_range_as_it_parses_them(capsys, option, value, allowed) -> None:
    line = argparse_error(capsys, [*TRAIN, option, value])
    assert line == f"cvt train: error: argument {option}: must be {allowed}; got {value!r}"


@pytest.mark.parametrize("argv, option", [
    (["eval", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--data", "d", "--workers", "-3"], "--workers"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["export", "m", "o.onnx", "--batch-size", "2000000"], "--batch-size"),
    (["export", "m", "o.onnx", "--opset", "0"], "--opset"),
])
def test_other_commands_refuse_numbers_outside_their_range(capsys, argv, option) -> None:
    assert f"argument {option}: must be" in argparse_error(capsys, argv)


def test_every_number_cvt_train_takes_has_a_range_and_the_recipes_are_within_them() -> None:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    numbers = {a.dest for a in sub.choices["train"]._actions if a.type in (int, float)}
    assert numbers <= {"image_size", "seed"}  # image_size: bounded as a size; any seed is a seed
    for name in ("finetune", "paper"):
        get_recipe(name)  # made, so checked


@pytest.mark.parametrize("change", [dict(batch_size=0), dict(lr=math.nan), dict(hflip=7.0), dict(epochs=0),
                                    dict(label_smoothing=2.0), dict(mixup=-1.0), dict(warmup_epochs=math.nan)])
def test_the_library_refuses_them_too_before_anything_is_written(tmp_path, change) -> None:
    name, value = next(iter(change.items()))
    options = TrainOptions(model=tiny_config(num_labels=3), data=tmp_path / "data", output_dir=tmp_path / "run",
                           image_size=32, **change)
    with pytest.raises(InvalidValueError, match=f"--{name.replace('_', '-')} must be {BOUNDS[name]}"):
        train(options)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InvalidValueError, match=f"the recipe's {name} must be"):
        get_recipe("finetune").replace(**change)


# ------------------------------------------------------------------------------ export
def test_a_fixed_export_batch_is_bounded_before_anything_is_allocated(tmp_path) -> None:
    model = cvt.CvtForImageClassification(tiny_config()).eval()
    low, high = EXPORT_BATCH_RANGE
    for batch in (high + 1, 2_000_000, 0):
        with pytest.raises(InvalidValueError, match=f"batch_size must be a whole number from {low} to {high}"):
            export.export_onnx(model, tmp_path / "model.onnx", image_size=64, batch_size=batch)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
def test_an_opset_torch_cannot_write_is_refused_and_nothing_written(tmp_path, capsys) -> None:
    """Asked for opset 1, torch's exporter silently wrote opset 18."""
    folder = save_tiny_classifier(tmp_path / "model")
    out = tmp_path / "model.onnx"
    capsys.readouterr()
    assert cli.main(["export", str(folder), str(out), "--opset", "1", "--no-check"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("cvt: error: opset 1: torch's ONNX exporter cannot write this model at that opset")
    assert "(it wrote opset 18)" in line and not out.exists()


# ------------------------------------------------------------------------------ attention
def test_the_attention_picture_size_is_bounded(capsys) -> None:
    low, high = PICTURE_SIZE_RANGE
    capsys.readouterr()
    assert cli.main(["attention", "m", "i.png", "--output", "o.png", "--size", "8192"]) == 2
    assert f"--size must be a positive whole number of pixels, from {low} to {high}" in capsys.readouterr().err


DRAW_WITHIN_A_GIGABYTE = """
import resource
import numpy as np
from PIL import Image
from cvt.modeling.attention_maps import AttentionMaps, draw
from cvt.constants import PICTURE_SIZE_RANGE

rng = np.random.default_rng(0)
grid = rng.random((14, 14)).astype(np.float32)
maps = AttentionMaps(Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)), grid[None],
                     grid, grid, True)
draw(maps, size=64)  # everything drawing needs is loaded
with open("/proc/self/statm") as f:
    mapped = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.RLIM_INFINITY))
size = PICTURE_SIZE_RANGE[1]
print(draw(maps, size=size).size == (size, size))
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the address space from Linux's /proc")
def test_the_largest_attention_picture_is_drawn_within_a_gigabyte(tmp_path) -> None:
    """The documented range is what fits: the largest size draws with 1 GB more address space
    (8192, inside the range before, needed 9 GB)."""
    env = {**os.environ, "PYTHONPATH": str(Path(cvt.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(DRAW_WITHIN_A_GIGABYTE)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
