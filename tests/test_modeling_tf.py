"""The TensorFlow models against the PyTorch ones (the oracle, itself tested against transformers
and the original code): outputs, losses, training, weights in and out, input errors, import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import cvt
from cvt import CheckpointError
from cvt.checkpoints import convert
from conftest import TINY_ARCHITECTURES, assert_close_to_scale, assert_gradients_close, randomise_, tiny_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's import: no C++ info logs
# first: it loads triton before TensorFlow, which later torch.compile tests need (see the module)
from cvt.tf import LAYOUTS, RULES, TFCvtForImageClassification, TFCvtModel  # noqa: E402

import keras  # noqa: E402  (the tf extra, which the dev extra includes)
import tensorflow as tf  # noqa: E402


# three of conftest's tiny architectures: every projection method, the cls token in the first, middle
# or last stage, exact and quick GELU, no q/k/v bias, fractional MLP ratio, dropout, odd and
# non-square inputs. (Every architecture's outputs against PyTorch: test_every_architecture.py.)
CONFIGS = {name: (TINY_ARCHITECTURES[name].config(), TINY_ARCHITECTURES[name].size) for name in (
    "dw_bn-cls_last", "avg_linear_dw_bn-cls_first-quick_gelu", "linear_dw_bn_avg-cls_middle-dropout")}


def tf_from_torch(model_class, torch_model):
    model = model_class(torch_model.config)
    model.load_pytorch_state_dict(torch_model.state_dict())
    return model


def close(actual, expected, rel=1e-5, msg=""):
    """Within `rel` of the expected values' scale (float32 rounding scales with the values)."""
    assert_close_to_scale(actual, expected, rel=rel, msg=msg)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(PyTorch classifier with random weights and BatchNorm statistics, its TF twin, input)."""
    config, size = CONFIGS[request.param]
    seed = list(CONFIGS).index(request.param)
    torch_model = randomise_(cvt.CvtForImageClassification(config), seed).eval()
    x = torch.randn(2, config.num_channels, *size, generator=torch.Generator().manual_seed(seed))
    return torch_model, tf_from_torch(TFCvtForImageClassification, torch_model), x


# ---------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])  # XLA: slow
def test_tf_function_gives_the_same_logits(pair, jit_compile) -> None:
    """The README's promise: the model runs inside tf.function, also compiled with XLA."""
    torch_model, tf_model, x = pair
    with torch.no_grad():
        expected = torch_model(x).logits
    graph = tf.function(lambda pixel_values: tf_model(pixel_values).logits, jit_compile=jit_compile)
    close(graph(tf.constant(x.numpy())), expected, msg=f"tf.function(jit_compile={jit_compile})")


def test_weights_round_trip_with_pytorch_keys_and_shapes(pair) -> None:
    torch_model, tf_model, _ = pair
    expected = torch_model.state_dict()
    exported = tf_model.pytorch_state_dict()
    assert list(exported) == list(expected)  # same keys, in PyTorch's order
    for key, value in exported.items():
        assert value.shape == tuple(expected[key].shape), key
        np.testing.assert_array_equal(value, expected[key].numpy(), err_msg=key)


def test_output_containers_and_defaults(pair) -> None:
    torch_model, tf_model, x = pair
    out = tf_model(x.numpy())
    assert out.hidden_states is None and out.loss is None  # config.output_hidden_states is False
    assert out["logits"] is out.logits and out[0] is out.logits and list(out) == ["logits"]
    as_tuple = tf_model(x.numpy(), output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert len(as_tuple[1]) == torch_model.config.num_stages
    base = TFCvtModel(torch_model.config)
    outputs = base(x.numpy(), return_dict=False)
    has_cls = torch_model.config.cls_token[-1]
    assert len(outputs) == (2 if has_cls else 1)
    h, w = cvt.config.stage_grids(torch_model.config, *x.shape[-2:])[-1]
    assert tuple(outputs[0].shape) == (2, torch_model.config.embed_dim[-1], h, w)
    if has_cls:
        assert tuple(outputs[1].shape) == (2, 1, torch_model.config.embed_dim[-1])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tf_class, torch_class", [(TFCvtForImageClassification, cvt.CvtForImageClassification),
                                                   (TFCvtModel, cvt.CvtModel)])
def test_variable_paths_are_the_pytorch_keys(name, tf_class, torch_class) -> None:
    """No name is translated by hand: a variable's key is its path below the model, '/' read as
    '.', its own name changed by the rule for its kind (RULES). The keys and PyTorch's state dict
    match one to one, both ways, with PyTorch's shapes under each kind's layout."""
    config, _ = CONFIGS[name]
    model = tf_class(config)
    expected = {k: tuple(v.shape) for k, v in torch_class(config).state_dict().items()}
    derived = {}
    for var in model.weights:
        assert var.path.startswith(f"{model.path}/"), var.path
        *layers, leaf = var.path.removeprefix(f"{model.path}/").split("/")
        leaf, layout = RULES.get((leaf, len(var.shape)), (leaf, "same"))
        key = ".".join([*layers, leaf])
        assert key not in derived, f"two variables for {key}"
        derived[key] = LAYOUTS[layout][1](np.zeros(var.shape, np.int8)).shape
    assert sorted(derived.keys() - expected.keys()) == []  # every TF variable is a PyTorch weight
    assert sorted(expected.keys() - derived.keys()) == []  # every PyTorch weight is a TF variable
    assert derived == expected
    # what `weights` leaves out of `variables` is Keras' random-seed state (dropout), no weight
    weight_ids = {id(v) for v in model.weights}
    assert all(v.path.endswith("seed_generator_state") for v in model.variables if id(v) not in weight_ids)


@pytest.mark.parametrize("channels, kernel", [(16, 3), (64, 3), (32, 5)])
def test_depthwise_kernels_initialise_as_pytorch(channels, kernel) -> None:
    """PyTorch's depthwise Conv2d default is U(-1/k, 1/k) (fan_in = k*k), whatever the channels."""
    from cvt.tf import DepthwiseConvBatchNorm

    keras.utils.set_random_seed(0)
    layer = DepthwiseConvBatchNorm(channels, kernel, 1, kernel // 2)
    layer.build((None, None, None, channels))
    bound = 1 / np.sqrt(kernel * kernel)
    largest = np.abs(layer.convolution.depthwise_kernel.numpy()).max()
    assert 0.5 * bound < largest <= bound, (largest, bound)


# ---------------------------------------------------------------------------------------- losses
def test_losses_match_pytorch_for_every_problem_type() -> None:
    config, size = CONFIGS["dw_bn-cls_last"]
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(7))
    cases = [
        (config, torch.tensor([0, 4, 1, -100])),  # integer classes; -100 is ignored, as in PyTorch
        (config, torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0] * 5])),
        # any other integer dtype than int64 / int32 is multi-label in PyTorch
        (config, torch.tensor([[1, 0, 1, 0, 0], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0] * 5], dtype=torch.uint8)),
        (config, torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1] * 5], dtype=torch.int16)),
        (config.replace(num_labels=1), torch.randn(4)),  # one label: regression
        (config.replace(problem_type="regression"), torch.randn(4, 5)),
    ]
    for case_config, labels in cases:
        torch_model = randomise_(cvt.CvtForImageClassification(case_config), 5).eval()
        tf_model = tf_from_torch(TFCvtForImageClassification, torch_model)
        with torch.no_grad():
            expected = torch_model(x, labels=labels).loss
        out = tf_model(x.numpy(), labels=labels.numpy())
        close(out.loss, expected, msg=str(labels))
        if labels.dtype == torch.long:  # int32 (torch.int) selects single-label too, as in PyTorch
            close(tf_model(x.numpy(), labels=labels.numpy().astype(np.int32)).loss, expected, msg="int32")
        assert tf_model.config.problem_type == case_config.problem_type  # never written back
    with pytest.raises(ValueError, match="multi-hot"):
        tf_model = TFCvtForImageClassification(config)
        tf_model(x.numpy(), labels=np.array([0.0, 2.0, 1.0, 1.0], np.float32))


# ---------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_in_pytorch(name, tmp_path) -> None:
    config, size = CONFIGS[name]
    tf_model = TFCvtForImageClassification(config)  # TF's own random initialisation
    x = np.random.default_rng(0).standard_normal((2, 3, *size), dtype=np.float32)
    tf_model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["architectures"] == ["CvtForImageClassification"]
    torch_model = cvt.CvtForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        close(tf_model(x).logits, torch_model(torch.from_numpy(x)).logits)
    again = TFCvtForImageClassification.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(x).logits.numpy(), tf_model(x).logits.numpy())


def test_save_pretrained_loads_in_transformers(tmp_path) -> None:
    """(transformers runs only the first configuration: dw_bn, a cls token in the last stage.)"""
    config, size = CONFIGS["dw_bn-cls_last"]
    torch_model = randomise_(cvt.CvtForImageClassification(config), 9).eval()
    tf_model = tf_from_torch(TFCvtForImageClassification, torch_model)
    tf_model.save_pretrained(tmp_path)
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        close(tf_model(x.numpy()).logits, theirs(x).logits)


def test_from_pretrained_reads_a_transformers_folder(tmp_path) -> None:
    arch = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=4)
    theirs = randomise_(transformers.CvtForImageClassification(transformers.CvtConfig(**arch)), 11).eval()
    theirs.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        expected_base = theirs.cvt(x)
    model = TFCvtForImageClassification.from_pretrained(tmp_path)
    out = model(x.numpy(), output_hidden_states=True)
    close(out.logits, expected.logits)
    for a, b in zip(out.hidden_states, expected.hidden_states):
        close(a, b)
    base = TFCvtModel.from_pretrained(tmp_path)  # the classifier's checkpoint, head left out
    out = base(x.numpy())
    close(out.last_hidden_state, expected_base.last_hidden_state)
    close(out.cls_token_value, expected_base.cls_token_value)


def test_from_pretrained_relabels_the_head(tmp_path, caplog) -> None:
    torch_model = randomise_(cvt.CvtForImageClassification(tiny_config()), 3)
    torch_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):  # as the PyTorch models
        TFCvtForImageClassification.from_pretrained(tmp_path, num_labels=3)
    model = TFCvtForImageClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3
    assert tuple(model.classifier.kernel.shape) == (48, 3)
    assert "classifier.weight" in caplog.text  # the warning names the re-initialised weights
    backbone = torch_model.state_dict()["cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight"]
    np.testing.assert_array_equal(
        model.pytorch_state_dict()["cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight"],
        backbone.numpy())


def load_reference(testdata, name: str, stem: str) -> torch.Tensor:
    return torch.load(testdata / name / f"{stem}.pt", weights_only=True)


@pytest.mark.parametrize("name", ["tiny_dwbn", "tiny_avg"])
@pytest.mark.parametrize("hidden_act, stem", [("quick_gelu", "logits"), ("gelu", "logits_gelu")])
def test_original_checkpoints_reproduce_the_reference_logits(testdata, name, hidden_act, stem) -> None:
    """../shared/testdata: original microsoft/CvT weights (.pth) and the original code's logits."""
    spec = json.loads((testdata / name / "spec.json").read_text())
    model = TFCvtForImageClassification.from_pretrained(
        testdata / name / "original_state_dict.pth", **{**convert.spec_fields(spec), "hidden_act": hidden_act})
    for shape in ("", "_nonsquare"):
        logits = model(load_reference(testdata, name, f"input{shape}").numpy()).logits
        close(logits, load_reference(testdata, name, f"{stem}{shape}"), msg=f"{name} {shape}")


def test_transformers_copy_of_the_reference_checkpoint(testdata) -> None:
    model = TFCvtForImageClassification.from_pretrained(testdata / "tiny_dwbn" / "hf")
    assert model.config.hidden_act == "gelu"
    for shape in ("", "_nonsquare"):
        logits = model(load_reference(testdata, "tiny_dwbn", f"input{shape}").numpy()).logits
        close(logits, load_reference(testdata, "tiny_dwbn", f"logits_gelu{shape}"))


# ---------------------------------------------------------------------------------------- bad weights
PROBE = "cvt.encoder.stages.1.layers.0.attention.attention.projection_key.weight"


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop(PROBE), f"1 missing: {PROBE}"),
    (lambda sd: sd.update({"cvt.encoder.stages.1.extra.weight": torch.zeros(2)}),
     "1 unexpected: cvt.encoder.stages.1.extra.weight"),
    (lambda sd: sd.update({PROBE: torch.zeros(32, 31)}), rf"{PROBE} \(checkpoint \(32, 31\), model \(32, 32\)\)"),
])
def test_wrong_weights_are_refused_by_name(change, message, tmp_path) -> None:
    torch_model = cvt.CvtForImageClassification(tiny_config())
    torch_model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    change(state_dict)
    with pytest.raises(CheckpointError, match=message):
        TFCvtForImageClassification(tiny_config()).load_pytorch_state_dict(state_dict)
    save_file(state_dict, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        TFCvtForImageClassification.from_pretrained(tmp_path)


def test_another_models_weights_are_refused() -> None:
    with pytest.raises(CheckpointError, match="does not look like a CvT checkpoint"):
        TFCvtModel(tiny_config()).load_pytorch_state_dict({"bert.embeddings.weight": torch.zeros(3)})


# ---------------------------------------------------------------------------------------- training
def tf_gradients_in_pytorch_layout(model, grads):
    by_variable = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    return {key: LAYOUTS[layout][1](by_variable[id(var)].numpy())
            for key, var, layout in model.pytorch_variables() if id(var) in by_variable}


def test_training_step_matches_pytorch() -> None:
    """training=True: batch-statistics BatchNorm with PyTorch's running-statistics update, the
    same loss and the same gradient for every trainable weight."""
    config = tiny_config(drop_path_rate=(0.0, 0.0, 0.0))
    torch_model = randomise_(cvt.CvtForImageClassification(config), 4).train()
    tf_model = tf_from_torch(TFCvtForImageClassification, torch_model)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 3, 1])
    loss = torch_model(x, labels=labels).loss
    loss.backward()
    with tf.GradientTape() as tape:
        tf_loss = tf_model(x.numpy(), labels=labels.numpy(), training=True).loss
    grads = tape.gradient(tf_loss, tf_model.trainable_variables)
    assert all(g is not None for g in grads)
    close(tf_loss, loss.detach())
    tf_grads = tf_gradients_in_pytorch_layout(tf_model, grads)
    torch_grads = {k: p.grad for k, p in torch_model.named_parameters()}
    assert_gradients_close(tf_grads, torch_grads, rel=1e-5)
    exported = tf_model.pytorch_state_dict()
    for key, value in torch_model.state_dict().items():
        if "running_" in key or "num_batches_tracked" in key:
            close(exported[key], value, msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sgd_steps_reduce_the_loss(name) -> None:
    keras.utils.set_random_seed(0)  # initialisation, dropout and stochastic depth: the same every run
    config, size = CONFIGS[name]
    model = TFCvtForImageClassification(config.replace(drop_path_rate=(0.0, 0.0, 0.2)))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, *size), dtype=np.float32)
    labels = np.array([0, 1, 2, 3])
    optimizer = keras.optimizers.SGD(learning_rate=0.05)
    losses = []
    for _ in range(4):
        with tf.GradientTape() as tape:
            loss = model(x, labels=labels, training=True).loss
        grads = tape.gradient(loss, model.trainable_variables)
        assert all(g is not None for g in grads), [v.path for v, g in zip(model.trainable_variables, grads) if g is None]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------- inputs, import
@pytest.mark.parametrize("pixel_values, training, message", [
    (np.zeros((1, 4, 64, 64), np.float32), False, "4 channels"),
    (np.zeros((3, 64, 64), np.float32), False, "3-D"),
    (np.zeros((1, 3, 64, 64), np.uint8), False, "floating-point"),
    (np.zeros((1, 3, 2, 2), np.float32), False, "too small"),
    (np.zeros((1, 3, 16, 16), np.float32), True, "batch of 2"),
    (np.zeros((1, 64, 64, 3), np.float32), False, "channels-last"),
])
def test_bad_input_is_explained(pixel_values, training, message) -> None:
    model = TFCvtForImageClassification(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(pixel_values, training=training)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.subprocess
def test_import_is_lazy_and_explains_a_missing_tensorflow() -> None:
    assert cvt.TFCvtForImageClassification is TFCvtForImageClassification
    assert "TFCvtModel" in dir(cvt)
    result = run_python(
        "import sys\n"
        "finders = list(sys.meta_path)\n"
        "import cvt\n"
        "assert not {'tensorflow', 'keras'} & set(sys.modules), 'import cvt loaded TensorFlow'\n"
        "assert sys.meta_path == finders, 'import cvt changed the import system'\n"
        "sys.modules['tensorflow'] = None\n"  # as if TensorFlow were not installed
        "try:\n    cvt.TFCvtModel\nexcept ImportError as err:\n    print(err)\n")
    assert result.returncode == 0, result.stderr
    assert 'pip install "cvt-vision[tf]"' in result.stdout


@pytest.mark.parametrize("fact", ["stage_in_channels", "layer_drop_path_rates",
                                  "query_projection_method", "loss_problem"])
def test_both_frameworks_read_shared_facts_from_the_config(fact, monkeypatch):
    """The drop-path ramp, the 'avg' query projection, each stage's input channels and the loss
    rule are computed once, on CvtConfig, and both models ask it (no private copies to drift)."""
    callers = set()
    original = getattr(cvt.CvtConfig, fact)

    def spy(self, *args, **kwargs):
        callers.add(sys._getframe(1).f_globals["__name__"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cvt.CvtConfig, fact, spy)
    config = tiny_config(qkv_projection_method=("avg", "dw_bn", "linear"), drop_path_rate=(0.0, 0.1, 0.2))
    labels = np.array([1, 0])
    torch_model = cvt.CvtForImageClassification(config)
    torch_model(torch.randn(2, 3, 64, 64), labels=torch.from_numpy(labels))
    tf_model = TFCvtForImageClassification(config)
    tf_model(np.random.randn(2, 3, 64, 64).astype("float32"), labels=labels)
    assert {"cvt.modeling", "cvt.tf"} <= callers
