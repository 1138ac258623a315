"""Training: DDP equals one process, resume equals an uninterrupted run, real learning on digits,
bad data is reported and skipped, a new head replaces only the head, and the pieces underneath
(data sources, recipes, optimiser groups, schedule, cvt eval)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt import cli
from cvt.images.processing import CvtImageProcessor
from cvt.training import DataError, TrainOptions, load_model, load_source, train
from cvt.training.data import split
from cvt.training.demo import write_digits
from cvt.training.optim import WarmupCosine, parameter_groups
from cvt.training.recipes import RECIPES
from cvt.training.state import STATE_NAME, StateWriteError, load_state, save_state

from conftest import (REPO_ROOT, TRAIN_IMAGE_SIZE, make_folder, make_model_folder, read_metrics,
                      read_weights, tiny_config)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def max_change(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def assert_same_training(start: dict, a: dict, b: dict, rel: float) -> None:
    """Two runs from `start` trained (a weight moved by more than 1e-2) and reached the same
    weights, within `rel` of the largest update. The bound scales with the update, not with the
    weights: AdamW's normalised step turns float rounding in the gradients (which differs between
    AVX2 and AVX-512 kernels) into weight differences proportional to the learning rate."""
    assert a.keys() == b.keys() == start.keys()
    moved = max_change(a, start)
    assert moved > 1e-2, f"the runs hardly trained (largest update {moved:.3g})"
    worst = max_change(a, b)
    assert worst <= rel * moved, f"weights differ by up to {worst:.3g}, {worst / moved:.3g} of the largest update {moved:.3g} (allowed {rel})"


# ------------------------------------------------------------------------------ distributed
@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_two_processes_equal_one_process(tmp_path, capsys):
    """2 gloo processes with global batch B give the weights of 1 process with batch B: same data
    order, per-image augmentation independent of the rank, gradients averaged by DDP.
    ('avg' projections: no BatchNorm, whose batch statistics would depend on the split. No
    q/k/v biases: the key bias has an exactly zero gradient, since softmax ignores a shift
    shared by all keys, and AdamW turns its float rounding noise into lr-sized steps.)"""
    data = make_folder(tmp_path / "data")
    config = tiny_config(qkv_projection_method=("avg", "avg", "avg"), drop_path_rate=(0.0, 0.0, 0.0),
                         qkv_bias=(False, False, False), num_labels=3)
    start = make_model_folder(tmp_path / "start", config)
    args = ["train", "--model", str(start), "--data", str(data), "--epochs", "2", "--batch-size", "8",
            "--lr", "3e-3", "--val-split", "0.25", "--workers", "0"]

    assert cli.main([*args, "--output-dir", str(tmp_path / "one")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    # torchrun is the console name of torch.distributed.run: this form works in any environment
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*torchrun, "-m", "cvt", *args, "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    one, two = read_weights(tmp_path / "one" / "last"), read_weights(tmp_path / "two" / "last")
    assert_same_training(read_weights(start), one, two, rel=1e-2)
    # the same steps and validation scores, each written once (only rank 0 writes)
    assert_same_metrics(tmp_path / "one", tmp_path / "two", steps=4, epochs=2, rel=1e-5)

    # cvt eval under torchrun: each process scores its share, every image counted exactly once
    evaluate = ["eval", "--model", str(tmp_path / "one" / "last"), "--data", str(data), "--format", "json",
                "--workers", "0"]
    run = subprocess.run([*torchrun, "-m", "cvt", *evaluate], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two_processes = json.loads(run.stdout)  # printed once, by rank 0
    capsys.readouterr()
    assert cli.main(evaluate) == 0
    one_process = json.loads(capsys.readouterr().out)
    assert two_processes["count"] == one_process["count"] == 24
    assert two_processes["per_class"] == one_process["per_class"]
    for key in ("top1", "top5", "loss"):
        assert two_processes[key] == pytest.approx(one_process[key], rel=1e-6, abs=0), key


def assert_same_metrics(a: Path, b: Path, steps: int, epochs: int, rel: float) -> None:
    """Two runs' metrics.jsonl: steps 1..steps once each with the same losses, and the same
    per-epoch scores (within `rel` of each value)."""
    steps_a, steps_b = ([r for r in read_metrics(run) if "loss" in r] for run in (a, b))
    assert [r["step"] for r in steps_b] == [r["step"] for r in steps_a] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in steps_b], [r["loss"] for r in steps_a], rtol=rel, atol=0)
    epochs_a, epochs_b = ([r for r in read_metrics(run) if "val_top1" in r] for run in (a, b))
    assert len(epochs_a) == len(epochs_b) == epochs
    for x, y in zip(epochs_a, epochs_b):
        for key in ("train_loss", "val_loss", "val_top1", "val_top5"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=0), key


# ------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    """Stopped mid-epoch and resumed (with another worker count), a run with RandAugment, random
    erasing, MixUp/CutMix, stochastic depth and an EMA ends with the same weights."""
    data = make_folder(tmp_path / "data")
    config = tiny_config(drop_path_rate=(0.1, 0.1, 0.2), num_labels=3)
    start = make_model_folder(tmp_path / "start", config)
    common = dict(model=str(start), data=data, recipe="paper", epochs=2, batch_size=6, lr=3e-3,
                  warmup_epochs=1, ema_decay=0.5, val_split=0.25)

    train(TrainOptions(output_dir=tmp_path / "whole", workers=0, **common))
    interrupted = TrainOptions(output_dir=tmp_path / "parts", workers=0, stop_at_step=4, **common)
    assert train(interrupted) is None
    assert load_state(tmp_path / "parts" / STATE_NAME)["step"] == 4  # mid-epoch (3 steps per epoch)
    train(TrainOptions(output_dir=tmp_path / "parts", workers=2, resume=True, **common))

    whole, parts = read_weights(tmp_path / "whole" / "last"), read_weights(tmp_path / "parts" / "last")
    assert_same_training(read_weights(start), whole, parts, rel=1e-4)
    # metrics.jsonl reads as one run: each step once, the same losses
    assert_same_metrics(tmp_path / "whole", tmp_path / "parts", steps=6, epochs=2, rel=1e-6)


def test_a_finished_run_continues_for_more_epochs_on_a_replanned_schedule(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=4)  # 12 images: 3 steps of 4 per epoch
    start = make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    args = ["train", "--model", str(start), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "4", "--val-split", "0", "--workers", "0", "--lr", "1e-3"]
    assert cli.main(args) == 0
    assert cli.main([*args, "--resume"]) == 2 and "--extend-epochs N" in capsys.readouterr().err
    assert cli.main([*args, "--extend-epochs", "2"]) == 2 and "needs --resume" in capsys.readouterr().err
    first = read_weights(tmp_path / "run" / "last")
    assert cli.main([*args, "--resume", "--extend-epochs", "2"]) == 0
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 10))
    assert max_change(read_weights(tmp_path / "run" / "last"), first) > 1e-4
    recipe = RECIPES["finetune"]
    replanned = WarmupCosine(1e-3, 9, 3, start=recipe.warmup_lr, floor=recipe.min_lr)
    assert [r["lr"] for r in steps[3:]] == pytest.approx([replanned(s) for s in range(3, 9)])
    assert steps[-1]["lr"] < steps[2]["lr"]  # the decay goes on over the new total


def test_truncated_state_is_refused_and_a_failed_save_keeps_the_previous_state(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=4)
    start = make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    args = ["train", "--model", str(start), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--epochs", "2", "--batch-size", "4", "--val-split", "0", "--workers", "0"]
    assert cli.main([*args, "--stop-at-step", "1"]) == 0
    state_path = tmp_path / "run" / STATE_NAME
    good = state_path.read_bytes()

    # a save that dies half-way (disk full, killed) leaves the previous state untouched
    def dying_save(obj, f):
        f.write(good[: len(good) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cvt.training.state.torch.save", dying_save)
    with pytest.raises(StateWriteError, match="No space left on device.*previous state .* is intact"):
        save_state(state_path, {"step": 99, "model": {}})
    monkeypatch.undo()
    assert state_path.read_bytes() == good
    assert load_state(state_path)["step"] == 1
    assert sorted(p.name for p in state_path.parent.iterdir() if p.name.endswith(".tmp")) == []

    # a truncated state file is refused with a clear error, and nothing is overwritten
    state_path.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("cvt: error: cannot resume from") and "truncated or corrupt" in last_line
    assert "Traceback" not in err
    assert state_path.read_bytes() == good[: len(good) // 2]

    # starting over into a folder that holds a run is refused too (nothing is clobbered)
    state_path.write_bytes(good)
    assert cli.main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real learning
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return root


@pytest.mark.slow
def test_tiny_cvt_learns_digits_and_writes_a_complete_run(digits, tmp_path, capsys):
    """scikit-learn's handwritten digits (1,438 train / 359 held out): real accuracy after 2 epochs
    (44 steps); the outputs are the documented layout and cvt eval / cvt.pipeline read them."""
    out = tmp_path / "run"
    tiny = tiny_config(drop_path_rate=(0.0, 0.0, 0.0))  # about 140 k parameters
    result = train(TrainOptions(model=tiny, data=digits, output_dir=out, epochs=2, batch_size=64,
                                lr=2e-3, hflip=0.0, image_size=24, workers=0))
    assert result.top1 >= 0.6, f"validation top-1 {result.top1:.3f} after 2 epochs"

    assert {p.name for p in out.iterdir()} >= {"best", "last", "metrics.jsonl", "curves.png", STATE_NAME}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(out)
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 45))
    assert all(r["lr"] > 0 and r["images_per_s"] > 0 and np.isfinite(r["loss"]) for r in step_rows)
    epoch_rows = [r for r in rows if "train_loss" in r]
    assert [r["epoch"] for r in epoch_rows] == [1, 2]
    for r in epoch_rows:
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 1 and r["val_loss"] > 0
    assert epoch_rows[-1]["val_top1"] == pytest.approx(result.top1)

    best = out / "best"
    model = cvt.CvtForImageClassification.from_pretrained(str(best))
    assert [model.config.id2label[i] for i in range(10)] == [str(d) for d in range(10)]
    assert CvtImageProcessor.from_pretrained(best).size == 24

    capsys.readouterr()
    assert cli.main(["eval", "--model", str(best), "--data", str(digits), "--format", "json",
                     "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(max(r["val_top1"] for r in epoch_rows))
    assert 0 <= report["top1"] <= report["top5"] <= 1 and report["loss"] > 0
    assert set(report["per_class"]) == {str(d) for d in range(10)}
    assert all(0 <= v <= 1 for v in report["per_class"].values())

    # the path `cvt predict` takes agrees with the evaluation on a held-out file
    path = sorted((digits / "val" / "7").glob("*.png"))[0]
    top = cvt.pipeline("image-classification", best, top_k=10)(str(path))
    assert len(top) == 10 and {p["label"] for p in top} == {str(d) for d in range(10)}


# ------------------------------------------------------------------------------ bad data, new head
def test_corrupt_image_and_empty_class_folder_are_reported_and_skipped(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=5)
    (data / "dog").mkdir()  # an empty class folder
    (data / "bee" / "garbage.jpg").write_bytes(b"this is not a JPEG")
    whole = (data / "cat" / "cat0.png")
    Image.open(whole).save(data / "cat" / "cut.jpg")
    jpeg = (data / "cat" / "cut.jpg").read_bytes()
    (data / "cat" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # header fine, data truncated
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    start = make_model_folder(tmp_path / "start", tiny_config(num_labels=3))

    assert cli.main(["train", "--model", str(start), "--data", str(data), "--output-dir",
                     str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--val-split", "0",
                     "--workers", "0"]) == 0  # 16 images: every one is read in the epoch
    err = capsys.readouterr().err
    assert "garbage.jpg" in err and "unreadable image" in err
    assert "cut.jpg" in err and "truncated" in err.lower()
    assert f"class folder {data / 'dog'} has no images" in err
    model = cvt.CvtForImageClassification.from_pretrained(str(tmp_path / "run" / "last"))
    assert sorted(model.config.id2label.values()) == ["ant", "bee", "cat"]
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before  # nothing modified


def test_other_label_count_replaces_only_the_head(tmp_path):
    source = make_model_folder(tmp_path / "five", tiny_config(num_labels=5))
    stored = read_weights(source)
    model = load_model(str(source), ["ant", "bee", "cat"])
    assert model.config.id2label == {0: "ant", 1: "bee", 2: "cat"}
    assert model.classifier.weight.shape == (3, 48)
    new = model.state_dict()
    head = {k for k in stored if k.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}
    for key in stored.keys() - head:
        torch.testing.assert_close(new[key], stored[key], rtol=0, atol=0)

    # a linear probe then trains the head and leaves every backbone tensor (BatchNorm
    # statistics too) as it was
    data = make_folder(tmp_path / "data", per_class=4)
    train(TrainOptions(model=str(source), data=data, output_dir=tmp_path / "probe", epochs=1,
                       batch_size=4, lr=1e-2, val_split=0, workers=0, freeze_backbone=True))
    probed = read_weights(tmp_path / "probe" / "last")
    backbone = [k for k in stored if k.startswith("cvt.")]
    assert any("running_mean" in k for k in backbone)
    for key in backbone:
        torch.testing.assert_close(probed[key], stored[key], rtol=0, atol=0)
    assert max_change({"w": probed["classifier.weight"]}, {"w": new["classifier.weight"]}) > 1e-3


def test_same_labels_in_another_order_keep_the_head(tmp_path):
    labels = {0: "cat", 1: "ant", 2: "bee"}
    source = make_model_folder(tmp_path / "m", tiny_config(id2label=labels, num_labels=3))
    model = load_model(str(source), ["ant", "bee", "cat"])
    assert model.config.id2label == labels
    torch.testing.assert_close(model.classifier.weight, read_weights(source)["classifier.weight"])
    train_images, _ = load_source(make_folder(tmp_path / "data", per_class=2), val_split=0)
    relabelled = train_images.relabel([labels[i] for i in range(3)], "data")
    assert [relabelled.classes[y] for y in relabelled.labels] == [train_images.classes[y] for y in train_images.labels]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4)
    config = tiny_config(qkv_projection_method=("avg", "avg", "avg"), qkv_bias=(False, False, False),
                         drop_path_rate=(0.0, 0.0, 0.0), num_labels=3)  # as for DDP: no BatchNorm
    start = make_model_folder(tmp_path / "start", config)
    common = dict(model=str(start), data=data, epochs=1, batch_size=4, lr=3e-3, val_split=0, workers=0)
    train(TrainOptions(output_dir=tmp_path / "whole", **common))
    train(TrainOptions(output_dir=tmp_path / "accumulated", accum_steps=2, **common))
    whole = read_weights(tmp_path / "whole" / "last")
    assert_same_training(read_weights(start), whole, read_weights(tmp_path / "accumulated" / "last"), rel=1e-2)


def test_grad_checkpointing_option_trains_the_same_weights_and_statistics(tmp_path):
    """`cvt train --grad-checkpointing` reaches the model and changes nothing but memory: the
    same weights and BatchNorm statistics after two steps (with drop path, seeded)."""
    data = make_folder(tmp_path / "data", per_class=4)
    start = make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    common = ["train", "--model", str(start), "--data", str(data), "--epochs", "1", "--batch-size", "6",
              "--lr", "3e-3", "--val-split", "0", "--workers", "0"]
    assert cli.main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    assert cli.main([*common, "--output-dir", str(tmp_path / "ckpt"), "--grad-checkpointing"]) == 0
    plain = read_weights(tmp_path / "plain" / "last")
    assert_same_training(read_weights(start), plain, read_weights(tmp_path / "ckpt" / "last"), rel=1e-2)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    """`--precision bf16` on the CPU: mixed-precision forward and backward, float32 weights."""
    data = make_folder(tmp_path / "data", per_class=4)
    start = make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    train(TrainOptions(model=str(start), data=data, output_dir=tmp_path / "bf16", precision="bf16",
                       epochs=1, batch_size=4, lr=3e-3, val_split=0.25, workers=0))
    bf16 = read_weights(tmp_path / "bf16" / "last")
    assert all(t.dtype == torch.float32 for t in bf16.values() if t.is_floating_point())
    assert max_change(bf16, read_weights(start)) > 1e-2
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "bf16") if "loss" in r)


# ------------------------------------------------------------------------------ data sources
def test_val_split_is_stratified_and_reproducible(tmp_path):
    images, _ = load_source(make_folder(tmp_path / "d", per_class=10), val_split=0)
    train_a, val_a = split(images, 0.2, seed=3)
    train_b, val_b = split(images, 0.2, seed=3)
    _, val_c = split(images, 0.2, seed=4)
    assert val_a.items == val_b.items and val_a.items != val_c.items
    assert sorted(val_a.labels) == [0, 0, 1, 1, 2, 2]
    assert not set(train_a.items) & set(val_a.items) and len(train_a) + len(val_a) == 30


def test_train_val_folders_and_tables(tmp_path):
    make_folder(tmp_path / "tree" / "train", per_class=3)
    make_folder(tmp_path / "tree" / "val", per_class=2, seed=1)
    train_images, val_images = load_source(tmp_path / "tree")
    assert train_images.classes == val_images.classes == ["ant", "bee", "cat"]
    assert (len(train_images), len(val_images)) == (9, 6)

    files = sorted((tmp_path / "tree" / "train").rglob("*.png"))
    (tmp_path / "tree" / "list.csv").write_text(
        "path,label\n" + "".join(f"{p.relative_to(tmp_path / 'tree')},{p.parent.name}\n" for p in files))
    (tmp_path / "tree" / "list.jsonl").write_text("".join(
        json.dumps({"path": str(p), "label": p.parent.name}) + "\n" for p in files))
    for table in ("list.csv", "list.jsonl"):
        images, val = load_source(tmp_path / "tree" / table, val_split=0)
        assert val is None and images.classes == ["ant", "bee", "cat"]
        assert [images.classes[y] for y in images.labels] == [p.parent.name for p in files]

    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        load_source(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="no such file or folder"):
        load_source(tmp_path / "missing")
    make_folder(tmp_path / "other" / "train", classes=("ant", "bee"), per_class=2)
    make_folder(tmp_path / "other" / "val", classes=("ant", "eel"), per_class=2)
    with pytest.raises(DataError, match="eel"):
        load_source(tmp_path / "other")


# ------------------------------------------------------------------------------ optimisation
def test_no_weight_decay_on_norms_biases_and_cls_token():
    model = cvt.CvtForImageClassification(tiny_config())
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "cvt.encoder.stages.2.cls_token" in no_decay_names
    assert all(n.endswith(("bias", "cls_token")) or "norm" in n for n in no_decay_names)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)
    assert any("convolution_projection.convolution" in n for n in decay_names)  # depthwise convs decay
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_warmup_then_cosine_per_step():
    schedule = WarmupCosine(peak=1e-3, total_steps=100, warmup_steps=10, start=1e-6, floor=1e-5)
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(5) == pytest.approx((1e-6 + 1e-3) / 2)
    assert schedule(10) == pytest.approx(1e-3)
    assert schedule(55) == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedule(100) == pytest.approx(1e-5)
    after = [schedule(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_warmup_is_never_longer_than_a_fifth_of_the_run():
    """A 1-epoch fine-tune with the recipe's 1-epoch warm-up still reaches its peak and decays."""
    schedule = WarmupCosine(peak=1e-3, total_steps=10, warmup_steps=10, start=1e-6, floor=1e-5)
    assert schedule(2) == pytest.approx(1e-3)
    assert schedule(10) == pytest.approx(1e-5)


def test_paper_recipe_is_the_original_imagenet_settings():
    paper = RECIPES["paper"]
    assert paper.peak_lr(1024) == pytest.approx(1e-3) and paper.peak_lr(256) == pytest.approx(2.5e-4)
    assert (paper.weight_decay, paper.epochs, paper.warmup_epochs, paper.min_lr) == (0.05, 300, 5, 1e-5)
    assert (paper.mixup, paper.cutmix, paper.label_smoothing, paper.random_erasing) == (0.8, 1.0, 0.1, 0.25)
    assert paper.randaugment and paper.crop_scale == (0.08, 1.0)


def test_training_option_errors_are_one_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=2)
    base = ["train", "--model", "cvt-13", "--from-scratch", "--data", str(data), "--output-dir",
            str(tmp_path / "o")]
    assert cli.main([*base, "--precision", "fp16"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
    assert cli.main([*base, "--batch-size", "6", "--accum-steps", "4"]) == 2
    assert "must be a multiple" in capsys.readouterr().err
    assert cli.main([*base, "--batch-size", "64", "--val-split", "0"]) == 2
    assert "no full step" in capsys.readouterr().err


def test_hugging_face_datasets_source(tmp_path):
    """A DatasetDict with image and ClassLabel columns, given as an object or saved to disk."""
    import datasets  # the optional `hf` extra, part of dev
    folder = make_folder(tmp_path / "images", per_class=4)
    files = sorted(folder.rglob("*.png"))
    names = ["ant", "bee", "cat"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def part(paths):
        return datasets.Dataset.from_dict(
            {"img": [str(p) for p in paths], "label": [names.index(p.parent.name) for p in paths]},
            features=features)

    dataset = datasets.DatasetDict(train=part(files[::2] + files[1::4]), validation=part(files[3::4]))
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source in (dataset, f"hf:{tmp_path / 'saved'}"):
        train_images, val_images = load_source(source)
        assert train_images.classes == names and (len(train_images), len(val_images)) == (9, 3)
        image = train_images.load(train_images.items[0])
        assert image.mode == "RGB" and image.size == (40, 40)

    result = train(TrainOptions(model=tiny_config(num_labels=3), data=dataset, output_dir=tmp_path / "run",
                                epochs=1, batch_size=3, image_size=TRAIN_IMAGE_SIZE, workers=0))
    assert result.count == 3



@pytest.mark.slow
@pytest.mark.subprocess
def test_cvt_demo_reaches_ninety_percent_offline(tmp_path, capsys):
    """The README's demo, as a user runs it: real digits, >= 0.9 held-out accuracy, and the
    `cvt train` layout plus a confusion matrix and predictions of held-out files."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    top1 = float(printed.split("top-1 ")[1].split()[0])
    assert top1 >= 0.9, printed
    assert {p.name for p in out.iterdir()} >= {"best", "last", "metrics.jsonl", "curves.png",
                                               "confusion_matrix.png", STATE_NAME, "data"}
    predictions = [line for line in printed.splitlines() if " predicted " in line]
    assert len(predictions) == 8 and all(str(out / "data" / "val") in line for line in predictions)
    assert sum(line.endswith("right") for line in predictions) >= 6
    epochs = [r for r in read_metrics(out) if "val_top1" in r]
    assert max(r["val_top1"] for r in epochs) == pytest.approx(top1, abs=1e-4)  # printed to 4 places

    assert cli.main(["demo", "--output-dir", str(out)]) == 2  # an existing run is never overwritten
    assert "already holds data, best, last, training_state.pt" in capsys.readouterr().err
