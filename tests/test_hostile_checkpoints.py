"""Hostile checkpoints: a config that does not fit its weights is refused before any large
allocation, weights no trained model has (integers for floats, NaN/inf, negative variances) are
refused by name unless asked for, shard indexes cannot reach outside the folder or be ambiguous,
and labels must cover every class index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cvt
from cvt import cli
from cvt.config import ConfigError
from cvt.errors import CheckpointError

from conftest import randomise_, tiny_config


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A good tiny checkpoint folder, which the tests then damage."""
    model = randomise_(cvt.CvtForImageClassification(tiny_config()), 0)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_weights(folder: Path, **changes: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "model.safetensors")
    tensors.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(tensors, folder / "model.safetensors")
    return tensors


# ------------------------------------------------------------------------------ config
PEAK_RSS = """
import resource, sys
# a cap on address space: a regression fails here instead of taking the machine's memory
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
import cvt
try:
    cvt.CvtForImageClassification.from_pretrained(sys.argv[1])
    print("LOADED")
except cvt.CheckpointError as err:
    print("REFUSED", err)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, often GBs)
print("PEAK_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


@pytest.mark.subprocess
def test_config_far_larger_than_its_weights_is_refused_before_allocating(folder) -> None:
    """embed_dim 15999 beside a ~0.6 MB weights file describes a ~24 GB model (within the
    config's bounds): it is compared with the weights' shapes before anything is allocated, and
    the process never grows past a few hundred MB over its imports (measured as its peak
    resident memory in a fresh process)."""
    edit_config(folder, embed_dim=[16, 32, 15999])
    assert (folder / "model.safetensors").stat().st_size < 1_000_000
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder)], capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(Path(cvt.__file__).parents[1]), "OMP_NUM_THREADS": "1",
                                           "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED" in run.stdout and "does not match" in run.stdout and "15999" in run.stdout
    peak_mb = int(run.stdout.split("PEAK_KB")[1]) / 1024
    assert peak_mb < 1500, f"peak resident memory {peak_mb:.0f} MB"


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_config_numbers_are_a_one_line_error(folder, value, capsys) -> None:
    path = folder / "config.json"
    text = json.dumps({**json.loads(path.read_text()), "mlp_ratio": [4, 0, 4]})
    path.write_text(text.replace('"mlp_ratio": [4, 0, 4]', f'"mlp_ratio": [4, {value}, 4]'))
    with pytest.raises(CheckpointError, match="mlp_ratio values must be positive finite numbers"):
        cvt.CvtForImageClassification.from_pretrained(folder)
    assert cli.main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "finite" in err
    with pytest.raises(ConfigError, match="initializer_range must be a positive finite number"):
        tiny_config(initializer_range=float("inf"))


def test_id2label_must_name_every_class_index(folder) -> None:
    edit_config(folder, id2label={"0": "a", "5": "b", "9": "c", "1": "d", "2": "e"})
    with pytest.raises(CheckpointError, match=r"id2label must name every class index 0\.\.4.*\[0, 1, 2, 5, 9\]"):
        cvt.CvtForImageClassification.from_pretrained(folder)
    with pytest.raises(ConfigError, match="every class index"):
        cvt.CvtConfig(id2label={0: "a", 5: "b", 9: "c"})
    assert cvt.CvtConfig(id2label={"1": "b", "0": "a"}).id2label == {0: "a", 1: "b"}  # order is free


# ------------------------------------------------------------------------------ weight values
def test_non_finite_weights_and_negative_variances_are_refused_by_name(folder) -> None:
    good = load_file(folder / "model.safetensors")
    dense = "cvt.encoder.stages.1.layers.0.attention.attention.projection_query.weight"
    var = "cvt.encoder.stages.0.layers.0.attention.attention.convolution_projection_key.convolution_projection.normalization.running_var"
    assert dense in good and var in good
    bad = {dense: good[dense].clone(), var: good[var].clone()}
    bad[dense][0, 0] = float("nan")
    bad[dense][1, 1] = float("inf")
    bad[var][0] = -0.5
    edit_weights(folder, **{k.replace(".", "__"): v for k, v in bad.items()})
    with pytest.raises(CheckpointError) as caught:
        cvt.CvtForImageClassification.from_pretrained(folder)
    message = str(caught.value)
    assert f"NaN or infinite values: {dense}" in message
    assert f"negative BatchNorm variances: {var}" in message and "check_weights=False" in message
    # the explicit opt-in loads them as they are
    model = cvt.CvtForImageClassification.from_pretrained(folder, check_weights=False)
    assert torch.equal(model.state_dict()[var], bad[var])
    assert torch.isnan(model.state_dict()[dense][0, 0])


def test_integer_values_for_float_weights_are_refused_but_batch_counters_are_normal(folder) -> None:
    good = load_file(folder / "model.safetensors")
    counters = [k for k, v in good.items() if k.endswith("num_batches_tracked")]
    assert counters and all(good[k].dtype == torch.int64 for k in counters)
    cvt.CvtForImageClassification.from_pretrained(folder)  # int64 counters: fine
    weight = "cvt.encoder.stages.2.layers.1.output.dense.weight"
    quantised = (good[weight] * 127 / good[weight].abs().max()).round().to(torch.int8)
    edit_weights(folder, **{weight.replace(".", "__"): quantised})
    with pytest.raises(CheckpointError, match=rf"integer values for floating-point weights: {weight} \(int8\)"):
        cvt.CvtForImageClassification.from_pretrained(folder)
    model = cvt.CvtForImageClassification.from_pretrained(folder, check_weights=False)
    assert torch.equal(model.state_dict()[weight], quantised.float())


# ------------------------------------------------------------------------------ shards
def write_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], names: dict[str, str] | None = None
                  ) -> None:
    """Shard files written under their names; the index maps each key to `names[file]` (default:
    the file's own name)."""
    (folder / "model.safetensors").unlink(missing_ok=True)
    weight_map = {}
    for file, tensors in shards.items():
        path = folder / file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path)
        weight_map.update({k: (names or {}).get(file, file) for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def halves(folder: Path) -> tuple[dict, dict]:
    tensors = load_file(folder / "model.safetensors")
    keys = list(tensors)
    return ({k: tensors[k] for k in keys[: len(keys) // 2]}, {k: tensors[k] for k in keys[len(keys) // 2:]})


def test_a_correct_sharded_checkpoint_loads(folder) -> None:
    first, second = halves(folder)
    write_sharded(folder, {"model-1.safetensors": first, "model-2.safetensors": second})
    model = cvt.CvtForImageClassification.from_pretrained(folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in {**first, **second}.items())


@pytest.mark.parametrize("outside", ["../other/model-2.safetensors", "ABSOLUTE", "sub/model-2.safetensors"])
def test_shard_names_cannot_leave_the_checkpoint_folder(folder, outside) -> None:
    first, second = halves(folder)
    target = folder.parent / "other" / "model-2.safetensors"
    name = str(target.resolve()) if outside == "ABSOLUTE" else outside
    write_sharded(folder, {"model-1.safetensors": first, "../other/model-2.safetensors": second,
                           "sub/model-2.safetensors": second},
                  names={"../other/model-2.safetensors": name, "sub/model-2.safetensors": name})
    assert (folder / name).is_file()  # the file exists: only the check keeps it from being read
    with pytest.raises(CheckpointError, match="a shard must be a plain file name in the checkpoint folder"):
        cvt.CvtForImageClassification.from_pretrained(folder)


def test_a_key_in_two_shards_is_an_error(folder) -> None:
    first, second = halves(folder)
    key = next(iter(second))
    write_sharded(folder, {"model-1.safetensors": {**first, key: second[key] + 1},
                           "model-2.safetensors": second})
    with pytest.raises(CheckpointError, match=rf"{key} is in two shards, model-1.safetensors and model-2"):
        cvt.CvtForImageClassification.from_pretrained(folder)


def test_an_index_that_does_not_describe_its_shards_is_an_error(folder) -> None:
    first, second = halves(folder)
    write_sharded(folder, {"model-1.safetensors": first, "model-2.safetensors": second})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved, dropped = next(iter(first)), next(iter(second))
    index["weight_map"][moved] = "model-2.safetensors"
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not describe its shards") as caught:
        cvt.CvtForImageClassification.from_pretrained(folder)
    assert f"{moved} (index: model-2.safetensors, found in model-1.safetensors)" in str(caught.value)
    assert f"{dropped} (index: not listed, found in model-2.safetensors)" in str(caught.value)


def test_a_single_file_beside_a_shard_index_is_an_error(folder) -> None:
    single = load_file(folder / "model.safetensors")
    first, second = halves(folder)
    write_sharded(folder, {"model-1.safetensors": first, "model-2.safetensors": second})
    save_file(single, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds both model.safetensors and the shard index"):
        cvt.CvtForImageClassification.from_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    cvt.CvtForImageClassification.from_pretrained(folder)  # one of them alone is fine
