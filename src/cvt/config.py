"""`CvtConfig`: the architecture of a CvT model, a transformers `PreTrainedConfig` with CvT's
field names and defaults.

It is transformers' config class for `model_type = "cvt"` in everything a user touches:
`save_pretrained`, `from_pretrained`, `to_json_string`, extra keywords kept as attributes,
`num_labels` relabelling `id2label`. On top, every field is checked when the config is built
(and again when a model is built from it), with errors that name the field. The defaults
describe CvT-13 and equal transformers' `CvtConfig` defaults. Every per-stage field is a tuple
with one entry per stage; the number of stages is `len(depth)`.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from transformers import PreTrainedConfig

from .errors import InvalidValueError, short

logger = logging.getLogger("cvt")

PROJECTION_METHODS = ("dw_bn", "avg", "linear")
ACTIVATIONS = ("gelu", "quick_gelu")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Per-stage fields: name -> (element type, smallest allowed value or None). Order = transformers'.
_STAGE_INT_FIELDS = {
    "patch_sizes": 1,
    "patch_stride": 1,
    "patch_padding": 0,
    "embed_dim": 1,
    "num_heads": 1,
    "depth": 1,
    "kernel_qkv": 1,
    "padding_kv": 0,
    "stride_kv": 1,
    "padding_q": 0,
    "stride_q": 1,
}
_STAGE_RATE_FIELDS = ("attention_drop_rate", "drop_rate", "drop_path_rate")

# What a config may declare. The published CvTs have 3 stages, 24 layers, 1,024 channels and
# 1,000 classes; the bounds leave room for other designs while keeping what a hostile config.json
# costs to check (or to build on the meta device, to compare with weights) under a second.
MAX_STAGES = 16
MAX_LAYERS = 128  # in all stages together
MAX_SIZE = 16384  # channels, and any kernel, stride or padding
MAX_MLP_RATIO = 64.0
MAX_LABELS = 200_000  # ImageNet-22k has 21,841 classes
_STAGE_BOOL_FIELDS = ("qkv_bias", "cls_token")


class ConfigError(InvalidValueError):
    """A configuration that describes no valid CvT model (a wrong type, a non-finite number,
    per-stage lists of different lengths, labels that do not cover every class index, ...)."""


class CvtConfig(PreTrainedConfig):
    """Configuration of `CvtModel` / `CvtForImageClassification`.

    Differs from transformers' only by `hidden_act`: "gelu" (exact erf, as transformers) or
    "quick_gelu" (x * sigmoid(1.702 x), as the original microsoft/CvT code that trained the
    released weights). `layer_norm_eps` is kept for config.json compatibility; like transformers
    and the original code, every LayerNorm uses eps 1e-5. Inherited fields (`id2label`,
    `problem_type`, `output_hidden_states`, `return_dict`, ...) are transformers'.
    """

    model_type = "cvt"

    num_channels: int = 3
    """Channels of the input image (3 for RGB)."""
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    """Kernel of each stage's convolutional token embedding."""
    patch_stride: tuple[int, ...] = (4, 2, 2)
    """Stride of each stage's token embedding: how much it shrinks the token grid."""
    patch_padding: tuple[int, ...] = (2, 1, 1)
    """Zero padding of each stage's token embedding."""
    embed_dim: tuple[int, ...] = (64, 192, 384)
    """Channels (token width) of each stage."""
    num_heads: tuple[int, ...] = (1, 3, 6)
    """Attention heads of each stage (64 channels per head in every released model)."""
    depth: tuple[int, ...] = (1, 2, 10)
    """Transformer layers in each stage; its length is the number of stages."""
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    """Hidden width of each stage's MLP, as a multiple of `embed_dim`."""
    attention_drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    """Dropout on each stage's attention probabilities (training only)."""
    drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    """Dropout after the token embedding, the attention output and the MLP (training only)."""
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)
    """Each stage's largest stochastic-depth rate, reached by its last layer (training only)."""
    qkv_bias: tuple[bool, ...] = (True, True, True)
    """Whether each stage's query, key and value linear layers have a bias."""
    cls_token: tuple[bool, ...] = (False, False, True)
    """Whether each stage prepends a learnt cls token; the last stage's feeds the classifier."""
    qkv_projection_method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    """How each stage projects tokens before attention: "dw_bn" (depthwise convolution +
    BatchNorm), "avg" (keys and values average-pooled, queries as "linear") or "linear"."""
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    """Kernel of each stage's query, key and value projections."""
    padding_kv: tuple[int, ...] = (1, 1, 1)
    """Padding of each stage's key and value projections."""
    stride_kv: tuple[int, ...] = (2, 2, 2)
    """Stride of each stage's key and value projections (2: a quarter of the keys)."""
    padding_q: tuple[int, ...] = (1, 1, 1)
    """Padding of each stage's query projection."""
    stride_q: tuple[int, ...] = (1, 1, 1)
    """Stride of each stage's query projection."""
    initializer_range: float = 0.02
    """Standard deviation of the truncated-normal initialisation of random weights."""
    layer_norm_eps: float = 1e-12
    """Kept for config.json compatibility: every LayerNorm uses 1e-5, as transformers and the original."""
    hidden_act: str = "gelu"
    """The MLP's activation: "gelu" (exact, as transformers) or "quick_gelu" (as the original code)."""

    def __post_init__(self, **kwargs: Any) -> None:
        num_labels = kwargs.get("num_labels")
        if self.id2label is not None and num_labels is not None and num_labels != len(self.id2label):
            raise ConfigError(f"CvtConfig: num_labels={num_labels} disagrees with id2label, "
                              f"which has {len(self.id2label)} entries")
        if num_labels is not None:
            self._check_int("num_labels", num_labels, minimum=0, maximum=MAX_LABELS)
        self._check_id2label()
        super().__post_init__(**kwargs)
        self.check()

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Validate every field and normalise the per-stage lists to tuples; a `ConfigError`
        names the field. Runs when the config is built and when a model is built from it (a
        field may have been assigned in between)."""
        self._check_scalars()
        self._normalise_stage_lists()
        self._check_stage_values()
        self._check_stage_geometry()
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"CvtConfig.hidden_act: unknown activation {self.hidden_act!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"CvtConfig.problem_type: unknown value {self.problem_type!r}; "
                f"expected None or one of {', '.join(PROBLEM_TYPES)}"
            )
        self._check_id2label()
        self.label2id = self._label2id_checked()

    @property
    def num_labels(self) -> int | None:
        """The classes `id2label` names (transformers' property)."""
        return len(self.id2label) if self.id2label is not None else None

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        """A new head size relabels `id2label` (LABEL_0, ...), as in transformers; bounded first."""
        self._check_int("num_labels", num_labels, minimum=0, maximum=MAX_LABELS)
        PreTrainedConfig.num_labels.fset(self, num_labels)

    def _check_scalars(self) -> None:
        self._check_int("num_channels", self.num_channels, minimum=1, maximum=MAX_SIZE)
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"CvtConfig.{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
    def _normalise_stage_lists(self) -> None:
        """Every per-stage field as a tuple, all of one length (the number of stages)."""
        num_stages = None
        for name in self.stage_fields():
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ConfigError(
                    f"CvtConfig.{name} must be a list with one value per stage, got {short(repr(value))}"
                )
            if len(value) > MAX_STAGES:
                raise ConfigError(f"CvtConfig.{name} has {len(value)} entries: at most {MAX_STAGES} stages")
            if num_stages is None:
                num_stages = len(value)
            elif len(value) != num_stages:
                raise ConfigError(
                    f"CvtConfig.{name} has {len(value)} entries but {self.stage_fields()[0]} has "
                    f"{num_stages}: every per-stage list needs one entry per stage"
                )
            setattr(self, name, tuple(value))
        if not num_stages:
            raise ConfigError("CvtConfig needs at least one stage; the per-stage lists are empty")

    def _check_stage_values(self) -> None:
        for name, minimum in _STAGE_INT_FIELDS.items():
            for v in getattr(self, name):
                self._check_int(name, v, minimum, maximum=MAX_SIZE)
        if sum(self.depth) > MAX_LAYERS:
            raise ConfigError(f"CvtConfig.depth {list(self.depth)} adds up to {sum(self.depth)} layers; "
                              f"at most {MAX_LAYERS}")
        for name in _STAGE_RATE_FIELDS:
            for v in getattr(self, name):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                    raise ConfigError(f"CvtConfig.{name} values must be rates in [0, 1), got {v!r}")
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        for v in self.mlp_ratio:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_MLP_RATIO:
                raise ConfigError(f"CvtConfig.mlp_ratio values must be positive finite numbers up to "
                                  f"{MAX_MLP_RATIO:g}, got {v!r}")
        self.mlp_ratio = tuple(float(v) for v in self.mlp_ratio)
        for name in _STAGE_BOOL_FIELDS:
            for v in getattr(self, name):
                if not isinstance(v, bool):
                    raise ConfigError(f"CvtConfig.{name} values must be true or false, got {v!r}")
        for v in self.qkv_projection_method:
            if v not in PROJECTION_METHODS:
                raise ConfigError(
                    f"CvtConfig.qkv_projection_method: unknown method {v!r}; "
                    f"expected one of {', '.join(PROJECTION_METHODS)}"
                )

    def _check_stage_geometry(self) -> None:
        for stage, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
            if dim % heads:
                raise ConfigError(
                    f"CvtConfig.embed_dim[{stage}] = {dim} is not divisible by "
                    f"num_heads[{stage}] = {heads}"
                )
        for stage, method in enumerate(self.qkv_projection_method):
            kernel, pad_q, pad_kv = self.kernel_qkv[stage], self.padding_q[stage], self.padding_kv[stage]
            if method == "dw_bn" and (self.stride_q[stage] != 1 or 2 * pad_q != kernel - 1):
                raise ConfigError(
                    f"CvtConfig: stage {stage} has stride_q={self.stride_q[stage]}, "
                    f"padding_q={pad_q} with kernel_qkv={kernel}; the query projection must keep "
                    f"the token grid (stride_q 1, padding_q (kernel_qkv - 1) / 2) because the "
                    f"attention output is added back onto the tokens"
                )
            if method == "avg" and 2 * pad_kv > kernel:
                raise ConfigError(
                    f"CvtConfig: stage {stage} uses 'avg' with padding_kv={pad_kv} > half of "
                    f"kernel_qkv={kernel}; average pooling allows at most half the kernel"
                )

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int, maximum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"CvtConfig.{name} values must be integers, got {short(repr(value))}")
        if value < minimum:
            kind = "positive" if minimum == 1 else "non-negative"
            raise ConfigError(f"CvtConfig.{name} values must be {kind}, got {value}")
        if value > maximum:
            raise ConfigError(f"CvtConfig.{name} values must be at most {maximum:,}, got {value:,}")

    def _check_id2label(self) -> None:
        """id2label, when given, names every class index 0..n-1 once (keys may be strings, as
        JSON writes them); labels become strings."""
        if self.id2label is None:
            return
        if not isinstance(self.id2label, dict):
            raise ConfigError(f"CvtConfig.id2label must be a mapping, got {short(repr(self.id2label))}")
        if len(self.id2label) > MAX_LABELS:
            raise ConfigError(f"CvtConfig.id2label names {len(self.id2label):,} classes; at most {MAX_LABELS:,}")
        try:
            indices = {int(k): str(v) for k, v in self.id2label.items()}
        except (TypeError, ValueError):
            raise ConfigError(
                f"CvtConfig.id2label keys must be class indices, got {list(self.id2label)[:5]}"
            ) from None
        if len(indices) != len(self.id2label):
            raise ConfigError(f"CvtConfig.id2label keys must be distinct integers; "
                              f"{_colliding(self.id2label)} name the same class index")
        if set(indices) != set(range(len(indices))):
            raise ConfigError(
                f"CvtConfig.id2label must name every class index 0..{len(indices) - 1} "
                f"once; its keys are {sorted(indices)[:10]}"
            )
        if indices != self.id2label:
            self.id2label = indices

    def _label2id_checked(self) -> dict[str, Any]:
        """label2id as given (values untouched, as transformers keeps them) when it is id2label's
        inverse (a repeated class name maps to one of its indices), else rebuilt from id2label,
        with a warning when one was given."""
        rebuilt = {label: i for i, label in self.id2label.items()}
        if self.label2id is None:
            return rebuilt
        try:
            given = {str(k): int(v) for k, v in dict(self.label2id).items()}
        except (TypeError, ValueError):
            given = None
        if given is not None and given.keys() == rebuilt.keys() and all(
                self.id2label.get(i) == label for label, i in given.items()):
            return self.label2id
        logger.warning("cvt: the config's label2id is not the inverse of its id2label; rebuilt from "
                       "id2label (the class names the model's outputs are reported by)")
        return rebuilt

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def stage_fields() -> tuple[str, ...]:
        """Names of the fields that hold one value per stage."""
        return (
            "patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "depth",
            "mlp_ratio", "attention_drop_rate", "drop_rate", "drop_path_rate", "qkv_bias",
            "cls_token", "qkv_projection_method", "kernel_qkv", "padding_kv", "stride_kv",
            "padding_q", "stride_q",
        )

    @staticmethod
    def architecture_fields() -> tuple[str, ...]:
        """The fields CvT adds to transformers' config (the architecture and its activation)."""
        return tuple(CvtConfig.__annotations__)

    def architecture(self) -> dict[str, Any]:
        """The architecture as plain JSON values (`architecture_fields`): what a model's shapes
        and computation depend on, without its labels or where it was loaded from."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(self, name)) for name in self.architecture_fields())}

    @property
    def num_stages(self) -> int:
        return len(self.depth)

    def replace(self, **changes: Any) -> CvtConfig:
        """A validated copy with some fields changed; `num_labels=` alone relabels the head."""
        config = copy.deepcopy(self)
        if "id2label" in changes and "label2id" not in changes:
            changes = {**changes, "label2id": None}
        for name, value in changes.items():
            setattr(config, name, value)
        config.check()
        return config

    @classmethod
    def of(cls, config: Any) -> CvtConfig:
        """`config` as a cvt config: itself, or a copy of transformers' own `CvtConfig` (so code
        that builds one with `AutoConfig` keeps working); anything else is a TypeError."""
        if isinstance(config, CvtConfig):
            return config
        if isinstance(config, PreTrainedConfig) and getattr(config, "model_type", None) == "cvt":
            return cls.from_dict(config.to_dict())
        raise TypeError(f"expected a cvt.CvtConfig (or transformers' CvtConfig), got {type(config).__name__}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CvtConfig:
        """transformers' `from_dict`, refusing another model's config by name; keyword arguments
        override fields after loading (`num_labels=7` relabels the stored head)."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"a CvT config must be a JSON object, got {type(config_dict).__name__}")
        model_type = config_dict.get("model_type", "cvt")
        if model_type != "cvt":
            raise ConfigError(
                f"this config describes a {model_type!r} model, not CvT (model_type 'cvt' expected)"
            )
        config_dict = {k: v for k, v in config_dict.items() if k != "num_labels" or "id2label" not in config_dict}
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.check()
        return result

    def stage_in_channels(self, stage: int) -> int:
        """Channels entering `stage`'s token embedding: the image's, then the previous stage's width."""
        return self.num_channels if stage == 0 else self.embed_dim[stage - 1]

    def stage_reductions(self) -> tuple[int, ...]:
        """How many input pixels one token of each stage spans per side (the product of the
        token-embedding strides so far): 4, 8, 16 for the released variants."""
        reductions, total = [], 1
        for stride in self.patch_stride:
            total *= stride
            reductions.append(total)
        return tuple(reductions)

    def layer_drop_path_rates(self, stage: int) -> list[float]:
        """Each layer's stochastic-depth rate in `stage`: linear from 0 to the stage's
        `drop_path_rate` over its layers, as in the original code."""
        depth, top_rate = self.depth[stage], self.drop_path_rate[stage]
        return [top_rate * j / (depth - 1) if depth > 1 else 0.0 for j in range(depth)]

    def query_projection_method(self, stage: int) -> str:
        """The original 'avg' method pools only keys and values; queries are projected linearly."""
        method = self.qkv_projection_method[stage]
        return "linear" if method == "avg" else method

    def loss_problem(self, integer_labels: bool) -> str:
        """transformers' choice of loss: `problem_type` when set, else regression for one label,
        single-label classification for integer (int64/int32) class indices, multi-label
        otherwise. Decided per call; the config is never modified."""
        if self.problem_type is not None:
            return self.problem_type
        if self.num_labels == 1:
            return "regression"
        return "single_label_classification" if integer_labels else "multi_label_classification"

    def macs_per_image(self, height: int, width: int) -> int:
        """Multiply-adds of one forward pass (convolutions, linear layers, attention products)."""
        return _count_macs(self, height, width)


def _colliding(id2label: dict[Any, Any]) -> str:
    """The keys of `id2label` that are one integer written differently ('1' and '01')."""
    groups: dict[int, list[str]] = {}
    for key in id2label:
        groups.setdefault(int(key), []).append(repr(key))
    return "; ".join(" and ".join(short(k) for k in keys) for keys in groups.values() if len(keys) > 1)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, ceil: bool = False) -> int:
    """Spatial size after a convolution or pooling window (PyTorch's formula)."""
    span = size + 2 * padding - kernel
    if span < 0:
        return 0
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:
        out -= 1  # PyTorch drops a last window that starts in the right padding
    return out


def kv_grid(config: CvtConfig, stage: int, height: int, width: int) -> tuple[int, int]:
    """Grid of the key/value tokens of `stage` for a token map of height x width."""
    method = config.qkv_projection_method[stage]
    if method == "linear":
        return height, width
    k, s, p = config.kernel_qkv[stage], config.stride_kv[stage], config.padding_kv[stage]
    ceil = method == "avg"
    return conv_output_size(height, k, s, p, ceil), conv_output_size(width, k, s, p, ceil)


def stage_grids(config: CvtConfig, height: int, width: int) -> list[tuple[int, int]]:
    """Token-map size after each stage's convolutional embedding (0 where the input is too small)."""
    grids = []
    for s in range(config.num_stages):
        k, st, p = config.patch_sizes[s], config.patch_stride[s], config.patch_padding[s]
        height, width = conv_output_size(height, k, st, p), conv_output_size(width, k, st, p)
        grids.append((height, width))
    return grids


def input_size_problem(config: CvtConfig, height: int, width: int) -> str | None:
    """Why a height x width input is too small for this architecture, or None if it fits."""
    for s, (h, w) in enumerate(stage_grids(config, height, width)):
        if h < 1 or w < 1:
            return (f"stage {s}'s token embedding (kernel {config.patch_sizes[s]}, stride "
                    f"{config.patch_stride[s]}, padding {config.patch_padding[s]}) gets an empty map")
        kh, kw = kv_grid(config, s, h, w)
        if kh < 1 or kw < 1:
            return (f"stage {s}'s {h}x{w} token map is smaller than its key/value projection "
                    f"window (kernel {config.kernel_qkv[s]}, padding {config.padding_kv[s]})")
    return None


def pixel_values_problem(config: CvtConfig, shape: tuple[int | None, ...], training: bool) -> str | None:
    """Why an input of this shape cannot go through the model (in training mode or not), or None.
    The shape checks that the PyTorch and the TensorFlow models share; each adds its own type and
    dtype checks. Only the batch may be unknown (None, in a traced TensorFlow graph)."""
    if len(shape) != 4:
        return (f"pixel_values must have shape (batch, channels, height, width); got a "
                f"{len(shape)}-D tensor of shape {shape}" + (" (add a batch dimension: x[None])" if len(shape) == 3 else ""))
    batch, channels, height, width = shape
    if batch == 0:
        return f"pixel_values is an empty batch (shape {shape}); pass at least one image"
    if channels != config.num_channels:
        return (f"pixel_values has {channels} channels but the model expects {config.num_channels} "
                f"(config.num_channels); is the tensor channels-last (B, H, W, C)?")
    problem = input_size_problem(config, height, width)
    if problem:
        return (f"an input of {height}x{width} pixels is too small for this model: {problem}; "
                f"the smallest square input is {min_input_size(config)} pixels a side")
    if training and batch == 1:
        for s, (h, w) in enumerate(stage_grids(config, height, width)):
            if config.qkv_projection_method[s] == "dw_bn" and kv_grid(config, s, h, w) == (1, 1):
                return (f"training on one {height}x{width} image leaves stage {s}'s BatchNorm a "
                        f"single value per channel (a 1x1 key/value map); train with a batch of 2 "
                        f"or more, on larger images, or switch training off for inference "
                        f"(model.eval() in PyTorch, training=False in TensorFlow)")
    return None


def min_input_size(config: CvtConfig) -> int:
    """Smallest square input the architecture accepts."""
    size = 1
    while input_size_problem(config, size, size) is not None:
        size += 1
    return size


def _count_macs(config: CvtConfig, height: int, width: int) -> int:
    macs = 0
    in_ch = config.num_channels
    for s, (h, w) in enumerate(stage_grids(config, height, width)):
        dim, k = config.embed_dim[s], config.patch_sizes[s]
        macs += h * w * dim * in_ch * k * k  # convolutional token embedding
        hk, wk = kv_grid(config, s, h, w)
        cls = int(config.cls_token[s])
        tokens, kv_tokens = h * w + cls, hk * wk + cls
        hidden = int(dim * config.mlp_ratio[s])
        per_layer = 0
        if config.qkv_projection_method[s] == "dw_bn":
            per_layer += (h * w + 2 * hk * wk) * dim * config.kernel_qkv[s] ** 2  # depthwise q, k, v
        per_layer += (tokens + 2 * kv_tokens) * dim * dim  # projection_query / key / value
        per_layer += 2 * tokens * kv_tokens * dim  # q @ k^T and attn @ v, all heads together
        per_layer += tokens * dim * dim  # attention output dense
        per_layer += 2 * tokens * dim * hidden  # MLP
        macs += config.depth[s] * per_layer
        in_ch = dim
    return macs + config.embed_dim[-1] * config.num_labels
