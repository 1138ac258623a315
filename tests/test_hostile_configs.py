"""A checkpoint's config and files are data an attacker may have written: every count a config
declares is bounded before anything is built, a checkpoint's head is judged by its classifier's
own weights, and saving never deletes files cvt did not write."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

import cvt
from cvt import CheckpointError, CvtConfig, CvtForImageClassification, CvtModel
from cvt.config import MAX_LABELS, MAX_LAYERS, ConfigError
from conftest import make_model_folder, read_weights, tiny_config


def build_nothing_from_here(monkeypatch) -> None:
    """From now on the test fails if any CvT layer is constructed (even on the meta device)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CvtLayer was built before the config was refused")

    monkeypatch.setattr(cvt.modeling.CvtLayer, "__init__", refuse)


def write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def refused_cheaply(folder, match):
    """The load is refused with `match`, its Python allocations peaking under 100 MB."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            CvtForImageClassification.from_pretrained(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MB"


def test_a_deep_config_beside_weights_of_no_stage_builds_nothing(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config(depth=(1, 1, 100)).to_dict()))
    save_file({"foo.weight": torch.zeros(3)}, folder / "model.safetensors")
    build_nothing_from_here(monkeypatch)
    refused_cheaply(folder, "does not look like a CvT checkpoint")


@pytest.mark.parametrize("changes, match", [
    (dict(depth=[1, 1, 20000]), "depth"),
    (dict(depth=[1] * 100000), "at most 16 stages"),
    (dict(num_labels=300_000_000, id2label=None, label2id=None), "num_labels"),
    (dict(embed_dim=[16, 32, 10**12]), "embed_dim"),
    (dict(mlp_ratio=[4.0, 4.0, 1e9]), "mlp_ratio"),
], ids=["20,000 layers", "100,000 stages", "300 million labels", "a trillion channels", "huge MLP"])
def test_every_count_a_config_declares_is_bounded_before_anything_is_built(
        tmp_path, monkeypatch, changes, match) -> None:
    folder = make_model_folder(tmp_path / "m", tiny_config())
    write_config(folder, **changes)
    build_nothing_from_here(monkeypatch)
    refused_cheaply(folder, match)


def test_bounds_hold_for_configs_made_in_python_too() -> None:
    with pytest.raises(ConfigError, match="layers"):
        CvtConfig(depth=(1, 1, MAX_LAYERS))
    config = CvtConfig()
    with pytest.raises(ConfigError, match="num_labels"):
        config.num_labels = MAX_LABELS + 1
    assert config.num_labels == 2


@pytest.mark.parametrize("content", [
    "[" * 200_000 + "]" * 200_000,
    " " * (17 * 2**20) + "{}",
], ids=["200,000 nested brackets", "17 MB of config"])
def test_a_config_file_too_deep_or_too_large_is_refused_as_such(tmp_path, content) -> None:
    folder = make_model_folder(tmp_path / "m", tiny_config())
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="nested too deeply|bytes"):
        CvtForImageClassification.from_pretrained(folder)


def test_a_final_norm_without_a_classifier_is_no_head(tmp_path) -> None:
    """A backbone checkpoint that also holds the final LayerNorm: `cvt.load` gives the backbone,
    never a classifier with a random head."""
    folder = make_model_folder(tmp_path / "m", tiny_config())
    weights = {k: v for k, v in read_weights(folder).items() if not k.startswith("classifier.")}
    save_file(weights, folder / "model.safetensors")
    assert type(cvt.load(folder)) is CvtModel


def test_saving_over_other_weight_files_is_refused_and_keeps_them(tmp_path) -> None:
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"a user's own file")
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        CvtForImageClassification(tiny_config()).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors.index.json", "pytorch_model.bin"]
    assert (folder / "pytorch_model.bin").read_bytes() == b"a user's own file"
