"""Shared test helpers: the architectures every model test runs on (tiny tricky ones and the
named variants), weight randomisation, scale-relative comparison, checkpoint and image folders,
and the shared test data. Test modules import from here, never from each other."""

from __future__ import annotations

import json
import time
import textwrap
import sys
import subprocess
import os
import math
import signal
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cvt
from cvt import CvtConfig

# The suite runs on three pytest-xdist workers (pyproject's addopts): one runs the tests that start
# Ray (xdist_group "ray"), which mostly wait on Ray's processes, while two compute on the two cores.
# Each worker, and every process it starts, computes on one thread: more would fight for the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # for the processes the tests start

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """`../shared/testdata` beside the repository; a clear failure (not a skip) when absent."""
    if not (TESTDATA / "README.md").is_file():
        pytest.fail(f"shared test data missing: expected {TESTDATA} (the repository's ../shared/testdata)")
    return TESTDATA


def tiny_config(stages: int = 3, **overrides) -> CvtConfig:
    """A CvT small enough for unit tests: stage s is 16 (s + 1) wide, with s + 1 heads and s + 1
    layers (3 stages: about 140 k parameters); every other per-stage field is CvT's own, the first
    stage's for the first, the last stage's for the last and the middle one's in between."""
    default = CvtConfig()

    def per_stage(values: tuple) -> tuple:
        return tuple(values[0] if s == 0 else values[-1] if s == stages - 1 else values[1]
                     for s in range(stages))

    fields = {name: per_stage(getattr(default, name)) for name in CvtConfig.stage_fields()}
    fields.update(embed_dim=tuple(16 * (s + 1) for s in range(stages)),
                  num_heads=tuple(range(1, stages + 1)), depth=tuple(range(1, stages + 1)), num_labels=5)
    return CvtConfig(**{**fields, **overrides})


@dataclass(frozen=True)
class Architecture:
    """A tiny architecture that takes one tricky path, and an input size for it."""

    fields: dict = field(default_factory=dict)  # tiny_config's arguments
    size: tuple[int, int] = (64, 64)

    def config(self, **overrides) -> CvtConfig:
        return tiny_config(**{**self.fields, **overrides})


# Every projection method ('dw_bn', 'avg', 'linear'), the cls token in the first, middle, last or
# no stage, 1 to 4 stages, exact and quick GELU, no q/k/v bias, fractional MLP ratios, dropout,
# square and non-square inputs with even and odd token maps (ceil-mode pooling windows overhang).
TINY_ARCHITECTURES = {
    "dw_bn-cls_last": Architecture(),  # CvtConfig's own choices, at tiny width
    "avg_linear_dw_bn-cls_first-quick_gelu": Architecture(dict(
        qkv_projection_method=("avg", "linear", "dw_bn"), cls_token=(True, False, False),
        hidden_act="quick_gelu"), (40, 56)),
    "linear_dw_bn_avg-cls_middle-dropout": Architecture(dict(
        qkv_projection_method=("linear", "dw_bn", "avg"), cls_token=(False, True, False),
        qkv_bias=(True, False, True), mlp_ratio=(4.0, 2.5, 3.0), drop_rate=(0.1, 0.1, 0.1),
        attention_drop_rate=(0.1, 0.0, 0.1)), (57, 77)),
    "dw_bn-cls_last-1_stage": Architecture(dict(stages=1, cls_token=(True,)), (33, 47)),
    "linear_dw_bn-no_cls-2_stages": Architecture(dict(
        stages=2, qkv_projection_method=("linear", "dw_bn"), cls_token=(False, False)), (56, 72)),
    "dw_bn-cls_last-4_stages": Architecture(dict(stages=4), (64, 96)),
}
VARIANTS = cvt.list_models()  # the seven published architectures, at full width


def transformers_computes(config: CvtConfig) -> bool:
    """Whether transformers' CvT builds and computes this architecture as the original code does:
    'dw_bn' projections only (it has no 'avg' nor 'linear'), a cls token in the last stage only
    (it sizes every cls token by the last width and pools no cls-free model), exact GELU, and
    depth[s] > s (its drop-path list is indexed by stage)."""
    return (set(config.qkv_projection_method) == {"dw_bn"} and config.cls_token[-1]
            and not any(config.cls_token[:-1]) and config.hidden_act == "gelu"
            and all(d > s for s, d in enumerate(config.depth)))


def _float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def assert_close_to_scale(actual, expected, rel: float = 1e-5, msg: str = "") -> None:
    """max |actual - expected| <= rel * max |expected|: a bound relative to the values' scale, as
    float32 rounding scales with them (kernels sum in another order on AVX2 and AVX-512 CPUs)."""
    actual, expected = _float64(actual), _float64(expected)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    scale = np.abs(expected).max(initial=0.0)
    worst = np.abs(actual - expected).max(initial=0.0)
    assert worst <= rel * scale, (f"{msg}: differ by up to {worst:.3g}, {worst / max(scale, 1e-300):.3g} "
                                  f"of their scale {scale:.3g} (allowed {rel})")


def assert_gradients_close(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    """Each gradient within `rel` of the largest expected gradient: the model's gradient scale,
    not each tensor's, since some gradients are zero but for rounding (a key bias: softmax ignores
    a shift shared by all keys) and their rounding noise has the scale of the sums that made it."""
    assert actual.keys() == expected.keys()
    scale = max(np.abs(_float64(g)).max(initial=0.0) for g in expected.values())
    for name, grad in expected.items():
        worst = np.abs(_float64(actual[name]) - _float64(grad)).max(initial=0.0)
        assert worst <= rel * scale, f"{name}: differs by up to {worst:.3g}, the largest gradient is {scale:.3g} (allowed {rel})"


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every weight and BatchNorm statistic a non-default random value, so that a test can
    not pass on initial values (unit LayerNorms, zero biases, identity BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith("cls_token"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:
                # residual-branch outputs get half gain, keeping the residual stream near unit
                # scale, where float32 rounding stays well below the 1e-5 parity tolerance
                gain = 0.5 if "output.dense" in name else 1.0
                t.copy_(torch.randn(t.shape, generator=g) * (gain / math.sqrt(t[0].numel())))
            elif name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model


TINY_LABELS = ("tabby cat", "espresso", "astronaut", "pagoda", "teapot")


def save_tiny_classifier(folder: Path, image_size: int = 64, seed: int = 1) -> Path:
    """A checkpoint folder as users have them: a randomised tiny classifier with named labels,
    in transformers' layout, with its preprocessor_config.json. (With seed 1 its top-1 label
    differs between the skimage/sklearn photographs; many seeds give one label to all.)"""
    from cvt import CvtForImageClassification, CvtImageProcessor

    model = CvtForImageClassification(tiny_config(id2label=dict(enumerate(TINY_LABELS))))
    randomise_(model, seed).save_pretrained(folder)
    CvtImageProcessor(size=image_size).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """Built engines go to one folder per test session, never to the user's cache; tests that
    build the same tiny model's engine twice reuse it, as users' second runs do. `auto` takes
    the fixed order instead of timing every engine (test_engines.py measures once)."""
    folder = tmp_path_factory.mktemp("engine-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("CVT_CACHE_DIR", str(folder))
    patch.setenv("CVT_AUTO_ENGINE", "order")
    yield folder
    patch.undo()



# the mark of every test that starts Ray: one worker runs them all, one at a time (CONTRIBUTING.md)
RAY_TESTS = pytest.mark.xdist_group("ray")


@pytest.fixture(autouse=True)
def ray_tests_come_first(request):
    """The tests that start Ray (xdist_group "ray") run on one worker beside two computing ones;
    Ray's processes then starve (an actor's start took 5 times as long). Where this process may
    raise its priority back (root), every other test runs at nice 10, and so do the processes it
    starts: they take the cores Ray leaves. Elsewhere every test runs at one priority."""
    marker = request.node.get_closest_marker("xdist_group")
    if marker and marker.args == RAY_TESTS.args or not os.environ.get("PYTEST_XDIST_WORKER") or os.geteuid() != 0:
        yield
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


@pytest.fixture
def one_torch_thread():
    """Tiny training runs gain nothing from a second thread, and on a shared 2-core machine a busy
    core stalls every two-thread kernel; one thread keeps the tests' time predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAIN_IMAGE_SIZE = 32


def make_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 8, seed: int = 0) -> Path:
    """An ImageFolder of small images whose class is visible (a tinted square at a class-specific
    place), so that a model can learn it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
            pixels[4 + 10 * c:16 + 10 * c, 4:30, c] = 255
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
    return root


def make_model_folder(folder: Path, config: CvtConfig, seed: int = 0) -> Path:
    """A randomised classifier of `config` with a 32-pixel preprocessor: a training start."""
    from cvt import CvtForImageClassification, CvtImageProcessor

    model = randomise_(CvtForImageClassification(config), seed)
    model.save_pretrained(str(folder))
    CvtImageProcessor(size=TRAIN_IMAGE_SIZE).save_pretrained(folder)
    return folder


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def read_metrics(out: Path) -> list[dict]:
    """A training run's metrics.jsonl, one dict a line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert cvt.checkpoints.convert's renaming table: a transformers-layout state dict in original key names."""
    from cvt.checkpoints import convert

    inverse = []
    for pattern, replacement in convert._RENAME_TABLE:
        groups = iter([r"\1", r"\2"])
        back = re.sub(r"\(\\d\+\)", lambda _: next(groups), pattern.strip("^$")).replace("\\.", ".")
        inverse.append((re.compile("^" + re.escape(replacement).replace(r"\\1", r"(\d+)").replace(r"\\2", r"(\d+)")),
                        back))
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, back in inverse:
            if pattern.match(key):
                renamed[pattern.sub(back, key)] = tensor
                break
        else:
            raise AssertionError(f"no original name for {key}")
    return renamed


def write_images(folder: Path, count: int = 24, labels=TINY_LABELS) -> Path:
    """Photos-like random images in class folders named after the model's labels."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = labels[i % len(labels)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    return folder


def as_args(options: dict) -> list[str]:
    args = ["train"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


@pytest.fixture()
def paused(tmp_path) -> tuple[dict, Path]:
    """A run of 2 epochs x 3 steps paused (state saved) after step 1, and its options."""
    data = make_folder(tmp_path / "data", per_class=4)
    options = dict(model=tmp_path / "start", data=data, output_dir=tmp_path / "run", epochs=2,
                   batch_size=4, lr=1e-3, val_split=0, workers=0)
    make_model_folder(options["model"], tiny_config(num_labels=3))
    from cvt import cli

    assert cli.main([*as_args(options), "--stop-at-step", "1"]) == 0
    return options, tmp_path


SLOW_LOADER = """
import pathlib, time
import cvt.images
_load = cvt.images.load_image
def load_image(path):
    if "slow" in str(path):  # a file on a stalled network share
        pathlib.Path({marker!r}).touch()
        time.sleep(60)
    return _load(path)
cvt.images.load_image = load_image
import cvt.training.data
cvt.training.data.load_image = load_image
"""


def as_at_a_terminal() -> None:
    """`preexec_fn` of a child a test sends Ctrl-C: SIGINT as a terminal leaves it, even when the
    tests run as a background job (which a shell starts with SIGINT ignored, and children inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_with_a_slow_file(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """`python -m cvt *args` with every file named slow* taking a minute to read; returns the
    process once it has started reading one."""
    marker, site = tmp_path / "slow-started", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SLOW_LOADER.format(marker=str(marker))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(cvt.__file__).resolve().parents[1])])}
    process = subprocess.Popen([sys.executable, "-m", "cvt", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, preexec_fn=as_at_a_terminal)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        process.kill()
        pytest.fail(f"the slow file was never read: {process.communicate(timeout=10)[1]}")
    return process, marker


def one_line_error(capsys, argv: list[str]) -> str:
    """Run `cvt argv`, which must fail as a user error (exit 2, no traceback); its last line."""
    from cvt import cli

    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def tiny_training_args(tmp_path: Path, out: Path) -> list[str]:
    """`cvt train`'s arguments for a tiny model, one epoch of 3 steps, into `out`."""
    data = make_folder(tmp_path / "data", per_class=4)
    if not (tmp_path / "start").exists():
        make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    return as_args(dict(model=tmp_path / "start", data=data, output_dir=out, epochs=1, batch_size=4,
                        lr=1e-3, val_split=0, workers=0))

