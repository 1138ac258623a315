"""The TensorFlow models the Keras way: compile/fit/evaluate/predict (the model's own loss with
labels in the batch, or a Keras loss), .keras files and SavedModels, channels-last input, tf.data
over image folders, MirroredStrategy on 2 CPU devices, and fine-tuning a PyTorch-trained digits
checkpoint in Keras."""

from __future__ import annotations

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
from cvt import CvtImageProcessor
from conftest import assert_close_to_scale, randomise_, tiny_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's import: no C++ info logs
from cvt.training.keras_data import image_dataset  # noqa: E402
from cvt.tf import TFCvtForImageClassification, TFCvtModel  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

# one layer a stage: tracing Keras' train, test and predict functions dominates these tests
NO_DROP = dict(drop_path_rate=(0.0, 0.0, 0.0), depth=(1, 1, 1))


def run_python(code: str) -> dict:
    """Run `code` in a fresh interpreter (TensorFlow's devices and Keras' registry untouched by
    this process); it prints one JSON line last, which is returned."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
                                 "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_batch(n: int = 16, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size), dtype=np.float32), np.arange(n) % 5


def running_means(model) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in model.non_trainable_variables if "running_mean" in v.path])


# ---------------------------------------------------------------------------------------- fit
def test_fit_with_labels_in_the_batch_uses_the_models_own_loss() -> None:
    keras.utils.set_random_seed(0)
    model = TFCvtForImageClassification(tiny_config(**NO_DROP))
    x, y = random_batch()
    data = tf.data.Dataset.from_tensor_slices({"pixel_values": x, "labels": y}).batch(8)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), metrics=["accuracy"], jit_compile=False)
    first = model.evaluate(data, verbose=0, return_dict=True)
    own = np.mean([float(model(x[i:i + 8], labels=y[i:i + 8]).loss) for i in (0, 8)])
    assert first["loss"] == pytest.approx(own, rel=1e-5, abs=0)
    assert 0 <= first["accuracy"] <= 1
    means = running_means(model)
    history = model.fit(data, epochs=4, verbose=0).history
    assert history["loss"][-1] < history["loss"][0], history
    assert model.evaluate(data, verbose=0, return_dict=True)["loss"] < first["loss"]
    assert np.abs(running_means(model) - means).max() > 1e-3  # BatchNorm statistics were updated
    predicted = model.predict(data, verbose=0)
    assert predicted.shape == (16, 5)
    assert_close_to_scale(predicted, model(x).logits.numpy(), rel=1e-5)


@pytest.mark.slow
def test_fit_with_a_keras_loss_and_xy_batches() -> None:
    keras.utils.set_random_seed(1)
    model = TFCvtForImageClassification(tiny_config(**NO_DROP))
    x, y = random_batch(seed=1)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
    first = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert first["loss"] == pytest.approx(float(model(x, labels=y).loss), rel=1e-5, abs=0)  # the same cross-entropy
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0, sample_weight=np.ones(16)).history
    assert history["loss"][-1] < history["loss"][0] and "top1" in history, history


def test_a_dict_batch_is_the_keyword_arguments() -> None:
    """Keras hands `call` a dict batch as it is: its pixel values, and its labels for the loss."""
    model = TFCvtForImageClassification(tiny_config())
    x, y = random_batch(4)
    from_dict = model({"pixel_values": x, "labels": y})
    np.testing.assert_array_equal(from_dict.logits.numpy(), model(x).logits.numpy())
    np.testing.assert_array_equal(from_dict.loss.numpy(), model(x, labels=y).loss.numpy())
    backbone = TFCvtModel(tiny_config())
    np.testing.assert_array_equal(backbone({"pixel_values": x, "labels": y}).last_hidden_state.numpy(),
                                  backbone(x).last_hidden_state.numpy())
    with pytest.raises(ValueError, match="needs 'pixel_values'"):
        model({"pixels": x})


def test_fit_needs_dataclass_outputs() -> None:
    model = TFCvtForImageClassification(tiny_config(return_dict=False, **NO_DROP))
    x, y = random_batch(4)
    model.compile(optimizer="sgd", jit_compile=False)
    with pytest.raises(ValueError, match="return_dict = True"):
        model.fit(x, y, batch_size=4, verbose=0)


def test_the_models_own_loss_refuses_sample_weights() -> None:
    model = TFCvtForImageClassification(tiny_config(**NO_DROP))
    x, y = random_batch(4)
    model.compile(optimizer="sgd", jit_compile=False)
    with pytest.raises(ValueError, match="sample weights need a Keras loss"):
        model.fit(x, y, sample_weight=np.ones(4), batch_size=4, verbose=0)


def test_backbone_predict_gives_feature_maps() -> None:
    model = TFCvtModel(tiny_config())
    x, _ = random_batch(4)
    model.compile(jit_compile=False)
    features = model.predict(x, batch_size=2, verbose=0)
    assert_close_to_scale(features, model(x).last_hidden_state.numpy(), rel=1e-5)


def test_a_frozen_backbone_keeps_its_batchnorm_statistics() -> None:
    """As Keras' BatchNormalization: a frozen layer normalises with its running statistics."""
    model = TFCvtForImageClassification(tiny_config(**NO_DROP))
    x, _ = random_batch(4)
    model.cvt.trainable = False
    means = running_means(model)
    frozen = model(x, training=True).logits
    np.testing.assert_array_equal(running_means(model), means)
    assert_close_to_scale(frozen.numpy(), model(x).logits.numpy(), rel=1e-6)
    model.cvt.trainable = True
    model(x, training=True)
    assert np.abs(running_means(model) - means).max() > 1e-3


# ---------------------------------------------------------------------------------------- NHWC
def test_channels_last_models_take_nhwc_input() -> None:
    torch_model = randomise_(cvt.CvtForImageClassification(tiny_config()), 2).eval()
    nchw = TFCvtForImageClassification(tiny_config())
    nhwc = TFCvtForImageClassification(tiny_config(), data_format="channels_last")
    for model in (nchw, nhwc):
        model.load_pytorch_state_dict(torch_model.state_dict())
    x = np.random.default_rng(2).standard_normal((2, 3, 40, 56), dtype=np.float32)
    assert_close_to_scale(nhwc(x.transpose(0, 2, 3, 1)).logits.numpy(), nchw(x).logits.numpy(), rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        nhwc(x)  # NCHW given to a channels-last model: 56 "channels"
    with pytest.raises(ValueError, match="data_format"):
        TFCvtModel(tiny_config(), data_format="NHWC")


def test_from_pretrained_takes_a_data_format(tmp_path) -> None:
    torch_model = randomise_(cvt.CvtForImageClassification(tiny_config()), 5).eval()
    torch_model.save_pretrained(tmp_path)
    model = TFCvtForImageClassification.from_pretrained(tmp_path, data_format="channels_last")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_model(x).logits.numpy()
    assert_close_to_scale(model(x.numpy().transpose(0, 2, 3, 1)).logits.numpy(), expected, rel=1e-5)


# ---------------------------------------------------------------------------------------- files
@pytest.mark.slow
@pytest.mark.subprocess
def test_keras_file_and_saved_model_reload_in_a_fresh_interpreter(tmp_path) -> None:
    """Both load in a new process that has imported cvt's TensorFlow models (which registers them
    with Keras: `keras.models.load_model` never imports cvt), and give the same logits."""
    torch_model = randomise_(cvt.CvtForImageClassification(tiny_config()), 3).eval()
    model = TFCvtForImageClassification(tiny_config(), data_format="channels_last")
    model.load_pytorch_state_dict(torch_model.state_dict())
    model.preprocessing = CvtImageProcessor(size=48).to_dict()
    model.save(tmp_path / "m.keras")
    model.export(tmp_path / "saved")
    x = np.random.default_rng(3).standard_normal((3, 48, 48, 3), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    report = run_python(
        "import json, numpy as np\n"
        "import cvt.tf\n"  # registers cvt>TFCvtForImageClassification, as the README says
        "import keras, tensorflow as tf\n"
        f"folder = {str(tmp_path)!r}\n"
        "x = np.load(folder + '/x.npy')\n"
        "served = tf.saved_model.load(folder + '/saved')\n"
        "signature = served.signatures['serving_default']\n"
        "spec = signature.structured_input_signature[1]['pixel_values']\n"
        "np.save(folder + '/served.npy', served.serve(x)['logits'].numpy())\n"
        "loaded = keras.models.load_model(folder + '/m.keras')\n"
        "np.save(folder + '/loaded.npy', loaded(x).logits.numpy())\n"
        "print(json.dumps({'shape': list(spec.shape), 'dtype': spec.dtype.name, 'outputs': "
        "sorted(signature.structured_outputs), 'class': type(loaded).__name__, 'data_format': "
        "loaded.data_format, 'preprocessing': loaded.preprocessing, 'config': loaded.config.to_dict()}))\n")
    assert report["shape"] == [None, 48, 48, 3] and report["dtype"] == "float32"
    assert report["outputs"] == ["logits"] and report["class"] == "TFCvtForImageClassification"
    assert report["data_format"] == "channels_last" and report["preprocessing"] == model.preprocessing
    assert report["config"] == json.loads(json.dumps(model.config.to_dict()))  # as JSON: string keys
    np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), model(x).logits.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "served.npy"),
                                  model.serving_function()(x)["logits"].numpy())


def test_export_needs_an_image_size_without_preprocessing(tmp_path) -> None:
    with pytest.raises(ValueError, match="give image_size"):
        TFCvtModel(tiny_config()).export(tmp_path / "saved")
    with pytest.raises(ValueError, match="tf_saved_model"):
        TFCvtModel(tiny_config()).export(tmp_path / "saved", format="onnx", image_size=32)


# ---------------------------------------------------------------------------------------- tf.data
def test_image_dataset_gives_the_processors_pixels(tmp_path) -> None:
    rng = np.random.default_rng(4)
    for name, count in (("cat", 3), ("dog", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    processor = CvtImageProcessor(size=24)
    data, classes = image_dataset(tmp_path, processor, batch_size=4)
    assert classes == ["cat", "dog"]
    batches = list(data.as_numpy_iterator())
    assert [len(b["labels"]) for b in batches] == [4, 1]
    files = sorted(tmp_path.glob("cat/*.png")) + sorted(tmp_path.glob("dog/*.png"))
    expected = processor([str(f) for f in files], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(np.concatenate([b["pixel_values"] for b in batches]), expected)
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), [0, 0, 0, 1, 1])
    pairs, classes = image_dataset(tmp_path, processor, batch_size=8, classes=["dog", "cat"],
                                   data_format="channels_last", as_dict=False)
    pixels, labels = next(pairs.as_numpy_iterator())
    assert classes == ["dog", "cat"] and list(labels) == [1, 1, 1, 0, 0]
    np.testing.assert_array_equal(pixels, expected.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------- 2 devices
MIRRORED = """
import json, numpy as np
from cvt import CvtConfig
from cvt.tf import TFCvtForImageClassification  # first: see cvt.tf on triton
import keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

rng = np.random.default_rng(0)
x = rng.standard_normal((8, 3, 32, 32), dtype=np.float32)
y = np.arange(8) % 5
devices = ["/cpu:0", "/cpu:1"]

def trained(config, strategy, start, epochs, optimizer):
    with strategy.scope():
        model = TFCvtForImageClassification(config)
        model.compile(optimizer=optimizer(), jit_compile=False)
    model.set_weights(start)
    history = model.fit({"pixel_values": x, "labels": y}, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history["loss"]

# no BatchNorm ('avg' projections), no dropout: one step on 2 devices is one step on 1
plain = CvtConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), num_labels=5,
                  qkv_projection_method=("avg",) * 3, drop_path_rate=(0.0, 0.0, 0.0))
keras.utils.set_random_seed(0)
start = TFCvtForImageClassification(plain).get_weights()
mirrored = tf.distribute.MirroredStrategy(devices)
sgd = lambda: keras.optimizers.SGD(0.5)
one, _ = trained(plain, tf.distribute.OneDeviceStrategy("/cpu:0"), start, 1, sgd)
two, _ = trained(plain, mirrored, start, 1, sgd)
step = max(float(np.abs(a - b).max()) for a, b in zip(one.get_weights(), start))
difference = max(float(np.abs(a - b).max()) for a, b in zip(one.get_weights(), two.get_weights()))

# with BatchNorm ('dw_bn', the default): a short run learns, and the statistics move
with_bn = plain.replace(qkv_projection_method=("dw_bn",) * 3)
keras.utils.set_random_seed(0)
start = TFCvtForImageClassification(with_bn).get_weights()
model, losses = trained(with_bn, mirrored, start, 10, lambda: keras.optimizers.Adam(2e-3))
moved = max(float(np.abs(v.numpy() - 0).max()) for v in model.non_trainable_variables if "running_mean" in v.path)
print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "step": step, "difference": difference,
                  "losses": losses, "moved": moved}))
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices() -> None:
    report = run_python(MIRRORED)
    assert report["replicas"] == 2
    assert report["step"] > 1e-3  # the step changed the weights ...
    assert report["difference"] <= 1e-3 * report["step"], report  # ... as on one device (to 0.1 % of the step)
    losses = report["losses"]
    assert losses[-1] < losses[0] and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert report["moved"] > 1e-3


# ---------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from cvt.training.demo import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return root


def digits_datasets(root: Path, processor: CvtImageProcessor):
    classes = [str(d) for d in range(10)]
    train, _ = image_dataset(root / "train", processor, batch_size=64, shuffle=True, classes=classes)
    val, _ = image_dataset(root / "val", processor, batch_size=128, classes=classes)
    return train, val


@pytest.mark.slow
def test_keras_fit_learns_the_digits_from_scratch(digits) -> None:
    from cvt.training.demo import DEMO_CONFIG, IMAGE_SIZE

    train, val = digits_datasets(digits, CvtImageProcessor(size=IMAGE_SIZE))
    keras.utils.set_random_seed(0)
    model = TFCvtForImageClassification(DEMO_CONFIG.replace(num_labels=10))
    model.compile(optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.05), metrics=["accuracy"],
                  jit_compile=False)
    model.fit(train, epochs=3, verbose=0)
    assert model.evaluate(val, verbose=0, return_dict=True)["accuracy"] >= 0.9


def train_in_pytorch(root: Path, processor: CvtImageProcessor, folder: Path) -> None:
    """One epoch of the compact demo CvT in PyTorch, saved as a checkpoint folder."""
    from cvt.training.data import read_folder
    from cvt.training.demo import DEMO_CONFIG

    torch.manual_seed(0)
    images = read_folder(root / "train")
    pixels = torch.from_numpy(processor([str(p) for p in images.items], return_tensors="np")["pixel_values"])
    labels = torch.tensor(images.labels)
    model = cvt.CvtForImageClassification(DEMO_CONFIG.replace(id2label=dict(enumerate(images.classes))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    for batch in torch.randperm(len(labels)).split(64):
        loss = model(pixels[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.mark.slow
def test_a_pytorch_checkpoint_scores_the_same_in_tf_and_fine_tunes_in_keras(digits, tmp_path) -> None:
    from cvt.training.demo import IMAGE_SIZE

    processor = CvtImageProcessor(size=IMAGE_SIZE)
    train_in_pytorch(digits, processor, tmp_path / "pt")
    train, val = digits_datasets(digits, processor)
    pixels, labels = (np.concatenate(parts) for parts in zip(
        *((b["pixel_values"], b["labels"]) for b in val.as_numpy_iterator())))
    torch_model = cvt.CvtForImageClassification.from_pretrained(tmp_path / "pt")
    with torch.no_grad():
        torch_predictions = torch_model(torch.from_numpy(pixels)).logits.argmax(-1).numpy()
    model = TFCvtForImageClassification.from_pretrained(tmp_path / "pt")
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.05), metrics=["accuracy"],
                  jit_compile=False)
    before = model.evaluate(val, verbose=0, return_dict=True)
    tf_predictions = model.predict(val, verbose=0).argmax(-1)
    np.testing.assert_array_equal(tf_predictions, torch_predictions)
    # a fraction k / n of the images: equal but for float32 rounding of the fraction
    assert before["accuracy"] == pytest.approx(float((torch_predictions == labels).mean()), abs=1e-6)
    model.fit(train.take(12), epochs=1, verbose=0)  # 12 steps of 64 images
    after = model.evaluate(val, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"], (before, after)
