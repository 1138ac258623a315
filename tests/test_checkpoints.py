"""Every checkpoint layout loads, strictly, with clear errors; saving is atomic and pickle-free."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cvt import CheckpointError, CvtForImageClassification, CvtModel
from conftest import assert_close_to_scale, randomise_, tiny_config


@pytest.fixture
def saved(tmp_path):
    """A random tiny classifier saved by us, and its folder."""
    model = randomise_(CvtForImageClassification(tiny_config()), 0).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def logits(model, x=None):
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)) if x is None else x
    with torch.no_grad():
        return model.eval()(x).logits


def test_saved_folder_layout(saved) -> None:
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cvt" and config["architectures"] == ["CvtForImageClassification"]
    assert load_file(folder / "model.safetensors").keys() == model.state_dict().keys()


def test_saved_files_have_ordinary_permissions(tmp_path) -> None:
    """Atomic writes go through a temporary file; the result still gets the umask's permissions
    (mkstemp's owner-only 0600 would hide a shared checkpoint from its other users)."""
    old = os.umask(0o022)
    try:
        CvtForImageClassification(tiny_config()).save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) == 0o644, name


def test_pytorch_model_bin(saved, tmp_path) -> None:
    model, folder = saved
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder)
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    torch.testing.assert_close(logits(CvtForImageClassification.from_pretrained(bin_folder)), logits(model))


def test_sharded_checkpoint_from_transformers(tmp_path) -> None:
    hf = randomise_(transformers.CvtForImageClassification(transformers.CvtConfig(
        embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=4)), 1).eval()
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = CvtForImageClassification.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close_to_scale(logits(ours, x), hf(x).logits, rel=1e-5)


def _fake_hub_cache(cache, repo_id: str, folder) -> None:
    """Lay out huggingface_hub's cache for `repo_id` as a finished download would."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_id_from_cache_offline(saved, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    model, folder = saved
    cache = tmp_path / "hub-cache"
    _fake_hub_cache(cache, "someone/tiny-cvt", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = CvtForImageClassification.from_pretrained("someone/tiny-cvt", cache_dir=cache)
    torch.testing.assert_close(logits(loaded), logits(model))
    with pytest.raises(CheckpointError, match="offline|cannot be reached"):
        CvtForImageClassification.from_pretrained("someone/not-cached", cache_dir=cache)


def test_backbone_checkpoint_loads_into_classifier_and_back(saved, tmp_path, caplog) -> None:
    model, folder = saved
    backbone = CvtModel.from_pretrained(folder)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).last_hidden_state, model.cvt(x).last_hidden_state)
    backbone.save_pretrained(tmp_path / "backbone")
    assert not any(k.startswith(("cvt.", "classifier")) for k in load_file(tmp_path / "backbone" / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="cvt"):
        classifier = CvtForImageClassification.from_pretrained(tmp_path / "backbone")
    assert "classifier.weight" in caplog.text and "newly initialised" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(classifier.cvt(x).last_hidden_state, model.cvt(x).last_hidden_state)


def test_new_label_count_replaces_only_the_head(saved, caplog) -> None:
    model, folder = saved
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):  # as transformers refuses
        CvtForImageClassification.from_pretrained(folder, num_labels=3)
    with caplog.at_level(logging.WARNING, logger="cvt"):
        relabelled = CvtForImageClassification.from_pretrained(folder, num_labels=3, ignore_mismatched_sizes=True)
    assert relabelled.config.num_labels == 3 and relabelled.classifier.weight.shape == (3, 48)
    assert "classifier.weight" in caplog.text
    for key, tensor in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(relabelled.state_dict()[key], tensor), key


def test_head_of_another_size_without_asking_is_an_error(saved) -> None:
    _, folder = saved
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        CvtForImageClassification.from_pretrained(folder, config=tiny_config(num_labels=9))
    model = CvtForImageClassification.from_pretrained(folder, config=tiny_config(num_labels=9),
                                                      ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 9


def test_config_overrides(saved) -> None:
    _, folder = saved
    model = CvtForImageClassification.from_pretrained(folder, hidden_act="quick_gelu")
    assert model.config.hidden_act == "quick_gelu"
    with pytest.raises(TypeError, match="colour"):  # neither a config field nor a loading argument
        CvtForImageClassification.from_pretrained(folder, colour="blue")


def _edit_weights(folder, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_listed(saved) -> None:
    _, folder = saved
    key = "cvt.encoder.stages.1.layers.0.attention.attention.projection_key.weight"
    _edit_weights(folder, lambda t: (t.pop(key), t.update(extra_weight=torch.zeros(3))))
    with pytest.raises(CheckpointError) as err:
        CvtForImageClassification.from_pretrained(folder)
    assert "1 missing: " + key in str(err.value) and "1 unexpected: extra_weight" in str(err.value)
    _edit_weights(folder, lambda t: t.update({key: torch.zeros(5, 5)}, ) or t.pop("extra_weight"))
    with pytest.raises(CheckpointError, match=r"another shape: .*projection_key.weight \(checkpoint \(5, 5\), model \(32, 32\)\)"):
        CvtForImageClassification.from_pretrained(folder)


def test_truncated_safetensors_is_refused(saved) -> None:
    _, folder = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        CvtForImageClassification.from_pretrained(folder)


def test_checkpoint_of_another_architecture(tmp_path) -> None:
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32))
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError, match="'vit'"):
        CvtForImageClassification.from_pretrained(tmp_path / "vit")
    # the same weights beside a CvT config.json
    (tmp_path / "vit" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="does not look like a CvT checkpoint"):
        CvtForImageClassification.from_pretrained(tmp_path / "vit")


def test_pickled_code_is_never_executed(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"weights": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        CvtForImageClassification.from_pretrained(tmp_path / "evil.pth")


def test_wrapped_original_training_checkpoint(testdata, tmp_path) -> None:
    """The original trainer's checkpoint.pth ({'state_dict': ...}) and DDP 'module.' keys load."""
    state = torch.load(testdata / "tiny_dwbn" / "original_state_dict.pth", weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    model = CvtForImageClassification.from_pretrained(tmp_path / "ckpt.pth", num_heads=[1, 2, 3])
    with torch.no_grad():
        out = model(torch.load(testdata / "tiny_dwbn" / "input.pt", weights_only=True)).logits
    assert_close_to_scale(out, torch.load(testdata / "tiny_dwbn" / "logits.pt", weights_only=True), rel=1e-5)


def test_failed_save_leaves_previous_files(saved, monkeypatch) -> None:
    model, folder = saved
    before = (folder / "model.safetensors").read_bytes()

    def broken_save(self, save_directory, **kwargs):  # transformers' writer, failing half-way
        (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_path_is_explained() -> None:
    with pytest.raises(CheckpointError, match="no such folder"):
        CvtForImageClassification.from_pretrained("./does/not/exist")


def test_original_checkpoint_with_a_new_label_count(testdata) -> None:
    """num_labels= on an original .pth (architecture inferred) replaces only the head, when asked."""
    path = testdata / "tiny_dwbn" / "original_state_dict.pth"
    model = CvtForImageClassification.from_pretrained(path, num_heads=[1, 2, 3], num_labels=4,
                                                      ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 4 and model.config.hidden_act == "quick_gelu"
    reference = CvtForImageClassification.from_pretrained(path, num_heads=[1, 2, 3])
    for key, tensor in reference.cvt.state_dict().items():
        assert torch.equal(model.cvt.state_dict()[key], tensor), key


def test_saving_a_quick_gelu_model_warns_that_transformers_runs_exact_gelu(tmp_path, caplog) -> None:
    """transformers' CvT ignores hidden_act: a folder saved from a QuickGELU model (as `cvt
    convert` writes original checkpoints) gives other logits there, so saving says so."""
    model = CvtForImageClassification(tiny_config(hidden_act="quick_gelu"))
    with caplog.at_level(logging.WARNING, logger="cvt"):
        model.save_pretrained(tmp_path / "quick")
    assert "transformers' CvT ignores hidden_act" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cvt"):
        CvtForImageClassification(tiny_config()).save_pretrained(tmp_path / "exact")
    assert caplog.text == ""
