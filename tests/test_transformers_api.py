"""cvt's classes are transformers models: a user of transformers' CvT changes one import and
keeps their calls, `from_pretrained` arguments, pipelines, `Trainer` scripts, PEFT adapters and
Auto classes. Each test is one thing such a user does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import cvt
from cvt import CheckpointError, CvtConfig, CvtForImageClassification, CvtModel
from conftest import assert_close_to_scale, make_folder, randomise_, tiny_config


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits.float()


@pytest.fixture
def x():
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def photos():
    """Three real photographs (scikit-image's astronaut, cat and coffee cup)."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(image) for image in (data.astronaut(), data.chelsea(), data.coffee())]


@pytest.fixture
def two_class_folder(tmp_path):
    model = randomise_(CvtForImageClassification(tiny_config(num_labels=2)), 0)
    model.save_pretrained(tmp_path / "model")
    return model.eval(), tmp_path / "model"


def test_config_keeps_extra_keywords_and_saves_like_transformers(tmp_path) -> None:
    config = CvtConfig(image_size=224, depth=[1, 2, 3])
    assert config.image_size == 224 and config.model_type == "cvt"
    assert CvtConfig(**config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    again = CvtConfig.from_pretrained(tmp_path)
    assert again.depth == (1, 2, 3) and again.image_size == 224
    assert json.loads(config.to_json_string())["image_size"] == 224
    config.to_json_file(tmp_path / "other.json")
    assert transformers.CvtConfig.from_json_file(tmp_path / "other.json").depth == [1, 2, 3]


@pytest.mark.parametrize("dtype_argument", ["dtype", "torch_dtype"])
def test_from_pretrained_takes_a_dtype(two_class_folder, x, dtype_argument) -> None:
    model, folder = two_class_folder
    assert CvtForImageClassification.from_pretrained(folder, **{dtype_argument: torch.float16}).dtype == torch.float16
    half = CvtForImageClassification.from_pretrained(folder, **{dtype_argument: torch.bfloat16})
    assert half.dtype == torch.bfloat16 and next(half.parameters()).dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: the logits agree to about a percent of their scale
    assert_close_to_scale(logits(half, x.bfloat16()), logits(model, x), rel=5e-2)


def test_from_pretrained_takes_transformers_loading_arguments(two_class_folder, tmp_path, x) -> None:
    model, folder = two_class_folder
    loaded, info = CvtForImageClassification.from_pretrained(
        folder, output_loading_info=True, use_safetensors=True, low_cpu_mem_usage=True,
        attn_implementation="eager")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert loaded.config._attn_implementation == "eager"
    assert_close_to_scale(logits(loaded, x), logits(model, x), rel=1e-6)
    (tmp_path / "repo").mkdir()
    model.save_pretrained(tmp_path / "repo" / "sub")
    assert_close_to_scale(logits(CvtForImageClassification.from_pretrained(tmp_path / "repo", subfolder="sub"), x),
                          logits(model, x), rel=1e-6)
    from_state = CvtForImageClassification.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert_close_to_scale(logits(from_state, x), logits(model, x), rel=1e-6)
    with pytest.raises(CheckpointError, match="no weights"):
        CvtForImageClassification.from_pretrained(folder, use_safetensors=False)


def test_a_head_of_another_size_needs_ignore_mismatched_sizes(two_class_folder) -> None:
    _, folder = two_class_folder
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        CvtForImageClassification.from_pretrained(folder, num_labels=7)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers refuses alike
        transformers.CvtForImageClassification.from_pretrained(folder, num_labels=7)
    model = CvtForImageClassification.from_pretrained(folder, num_labels=7, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 7 and model.classifier.out_features == 7


def test_num_labels_set_after_construction_saves_a_folder_both_libraries_load(tmp_path, x) -> None:
    config = tiny_config(num_labels=2)
    config.num_labels = 5
    assert len(config.id2label) == 5 and len(config.label2id) == 5
    model = CvtForImageClassification(config)
    model.save_pretrained(tmp_path)
    assert len(json.loads((tmp_path / "config.json").read_text())["id2label"]) == 5
    ours = CvtForImageClassification.from_pretrained(tmp_path)
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path)
    assert ours.config.num_labels == theirs.config.num_labels == 5
    assert_close_to_scale(logits(theirs, x), logits(ours, x), rel=1e-5)


def test_device_dtype_parameter_counts_and_sharded_saves(tmp_path, x) -> None:
    model = CvtForImageClassification(tiny_config())
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    for parameter in model.cvt.parameters():
        parameter.requires_grad_(False)
    head = sum(p.numel() for p in model.layernorm.parameters()) + sum(p.numel() for p in model.classifier.parameters())
    assert model.num_parameters(only_trainable=True) == head
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    for loaded in (CvtForImageClassification.from_pretrained(tmp_path),
                   transformers.CvtForImageClassification.from_pretrained(tmp_path)):
        assert_close_to_scale(logits(loaded, x), logits(model, x), rel=1e-5)


def test_gradients_reach_every_hidden_state(x) -> None:
    """Grad-CAM on any stage: the returned maps are the ones the next stage reads."""
    model = CvtForImageClassification(tiny_config()).eval()
    out = model(x, output_hidden_states=True)
    for hidden in out.hidden_states:
        hidden.retain_grad()
    out.logits[:, 0].sum().backward()
    assert all(h.grad is not None for h in out.hidden_states)
    # the logits read the last stage's cls token only; every earlier map feeds them
    assert all(bool(h.grad.abs().sum() > 0) for h in out.hidden_states[:-1])


def test_a_model_built_on_the_meta_device_initialises_fully(x) -> None:
    with torch.device("meta"):
        model = CvtForImageClassification(tiny_config())
    model.to_empty(device="cpu")
    model.init_weights()
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            assert torch.equal(buffer, torch.ones_like(buffer)), name
        elif name.endswith("running_mean"):
            assert torch.equal(buffer, torch.zeros_like(buffer)), name
    assert torch.isfinite(logits(model, x)).all()


def test_transformers_pipeline_runs_a_cvt_model_like_cvt_pipeline(tmp_path, photos) -> None:
    model = randomise_(CvtForImageClassification(tiny_config(num_labels=10, id2label={i: f"class {i}" for i in range(10)})), 3)
    model.preprocessing = cvt.get_variant("cvt-13").preprocessor_config()
    model.save_pretrained(tmp_path)
    ours = cvt.pipeline("image-classification", model=str(tmp_path), top_k=5, engine="torch")(photos)
    for processor in (cvt.CvtImageProcessor.from_pretrained(tmp_path),
                      transformers.AutoImageProcessor.from_pretrained(tmp_path)):
        theirs = transformers.pipeline("image-classification", model=model.eval(), image_processor=processor,
                                       top_k=5)(photos)
        assert [[p["label"] for p in row] for row in theirs] == [[p["label"] for p in row] for row in ours]
        for mine, other in zip(ours, theirs):  # probabilities: 1 is their scale
            assert max(abs(a["score"] - b["score"]) for a, b in zip(mine, other)) < 1e-4


def test_transformers_own_config_builds_and_loads_cvt_models(two_class_folder, x) -> None:
    model, folder = two_class_folder
    theirs = transformers.AutoConfig.from_pretrained(folder)
    assert type(theirs) is transformers.CvtConfig
    assert type(CvtForImageClassification(theirs).config) is CvtConfig
    loaded = CvtForImageClassification.from_pretrained(folder, config=theirs)
    assert_close_to_scale(logits(loaded, x), logits(model, x), rel=1e-6)
    with pytest.raises(TypeError, match="CvtConfig"):
        CvtModel(transformers.ViTConfig())


def test_auto_classes_build_cvt_models_from_a_cvt_config() -> None:
    config = tiny_config()
    assert type(transformers.AutoModel.from_config(config)) is CvtModel
    assert type(transformers.AutoModelForImageClassification.from_config(config)) is CvtForImageClassification


def _image_folder_dataset(root):
    import datasets

    make_folder(root / "train", per_class=8, seed=0)
    make_folder(root / "validation", per_class=4, seed=1)
    return datasets.load_dataset("imagefolder", data_dir=str(root))


@pytest.mark.slow
def test_trainer_fine_tunes_a_cvt_model_on_an_image_folder(tmp_path, x) -> None:
    """The image-classification example's recipe: imagefolder, the processor as a transform,
    accuracy as compute_metrics, 2 epochs; the saved folder loads in both libraries."""
    data = _image_folder_dataset(tmp_path / "images")
    labels = data["train"].features["label"].names
    processor = cvt.CvtImageProcessor(size=32)
    data = data.with_transform(lambda batch: {
        "pixel_values": processor([image.convert("RGB") for image in batch["image"]])["pixel_values"],
        "labels": batch["label"]})
    model = randomise_(CvtForImageClassification(tiny_config(num_labels=len(labels), id2label=dict(enumerate(labels)))), 0)

    def compute_metrics(prediction):
        return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=1) == prediction.label_ids))}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=8,
        learning_rate=1e-3, eval_strategy="epoch", save_strategy="no", logging_steps=1,
        remove_unused_columns=False, report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data["train"],
                                   eval_dataset=data["validation"], compute_metrics=compute_metrics,
                                   data_collator=lambda rows: {
                                       "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                                       "labels": torch.tensor([r["labels"] for r in rows])})
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert "eval_accuracy" in trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    ours = CvtForImageClassification.from_pretrained(tmp_path / "saved")
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path / "saved")
    assert ours.config.id2label == theirs.config.id2label == dict(enumerate(labels))
    assert_close_to_scale(logits(theirs, x), logits(ours, x), rel=1e-5)
    assert_close_to_scale(logits(ours, x), logits(trainer.model, x), rel=1e-6)


def test_a_lora_adapter_trains_saves_reloads_and_merges(tmp_path, x) -> None:
    import peft  # the peft extra
    base = randomise_(CvtForImageClassification(tiny_config()), 0).eval()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["projection_query", "projection_key", "projection_value"],
                           modules_to_save=["classifier"], init_lora_weights=False)
    adapted = peft.get_peft_model(randomise_(CvtForImageClassification(tiny_config()), 0), lora)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    optimiser = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    # a step in eval mode: the base's BatchNorm statistics, which the adapter does not carry, stay
    adapted.eval()
    adapted(pixel_values=x, labels=torch.tensor([0, 1])).loss.backward()
    optimiser.step()
    expected = logits(adapted, x)
    assert not torch.allclose(expected, logits(base, x))
    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(randomise_(CvtForImageClassification(tiny_config()), 0),
                                              tmp_path / "adapter")
    assert_close_to_scale(logits(reloaded, x), expected, rel=1e-5)
    merged = reloaded.merge_and_unload()
    assert type(merged) is CvtForImageClassification
    assert_close_to_scale(logits(merged, x), expected, rel=1e-5)
