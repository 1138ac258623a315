"""CvT in TensorFlow (Keras 3), the twin of `cvt.modeling`: same configs, weights and outputs.

Top to bottom: small Keras layers (a depthwise convolution, BatchNorm with PyTorch's running
statistics, average pooling in ceil mode, stochastic depth), then the attention, layer, stage
and encoder, then `TFCvtModel` and `TFCvtForImageClassification`.

The maths is that of our PyTorch model, fixes over transformers included: 'avg' and 'linear'
projections, a cls token in any stage, mean pooling when the last stage has no cls token,
stochastic depth ramping linearly over each stage's layers and dropping only the residual
branch, exact GELU or `hidden_act="quick_gelu"`, LayerNorm eps 1e-5, attention scaled by
`embed_dim ** -0.5`. Inputs and outputs are NCHW as in PyTorch (inputs NHWC with
`data_format="channels_last"`); inside, maps are NHWC (`(B, H, W, C)`, whose flattening is the
token tensor `(B, H*W, C)`).

Keras, through its public API only: the models are registered serialisable classes
(`get_config`: .keras files); `call` returns the output dataclass (and also takes a dict batch
`{"pixel_values", "labels"}`), and the public hooks `fit` / `evaluate` / `predict` go through
(`compute_loss`, `compute_metrics`, `predict_step`) hand Keras the main tensor (logits), trained
with a compiled Keras loss or, given labels in the batch, the model's own loss; `export` writes
a SavedModel with a serving signature.

Weights: each Keras layer is named after the PyTorch module it computes, dotted where PyTorch
nests modules that have no Keras twin of their own (`attention.output.dense`), so a variable's
PyTorch state-dict key is its path below the model, `/` read as `.`, with the variable's own
name changed by one rule per kind of variable (`RULES`: a Dense or Conv2D kernel is `weight`,
stored transposed as `LAYOUTS` says). `pytorch_state_dict()` / `load_pytorch_state_dict()`
convert in memory through numpy; `from_pretrained` and `save_pretrained` go through
`cvt.checkpoints`, so the TensorFlow models read and write exactly the files the PyTorch models do
(config.json + model.safetensors in transformers' layout, hub ids, original microsoft/CvT .pth
files).

Side effects of importing this module, the only ones of cvt's TensorFlow side:
- triton (torch's compiler, installed with torch on Linux) is imported before TensorFlow, when
  TensorFlow is not loaded yet (see below);
- `TFCvtModel` and `TFCvtForImageClassification` register with Keras as `cvt>TFCvtModel` and
  `cvt>TFCvtForImageClassification`. `keras.models.load_model` only finds registered classes and
  never imports cvt, so import this module (or use `cvt.TFCvtForImageClassification`) before
  loading a .keras file, or pass `custom_objects`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

# TensorFlow and triton each carry their own LLVM, and loading triton's after TensorFlow's crashes
# the process (a segfault at `import torch._dynamo`, i.e. at the first torch.compile or
# transformers model; still so with TensorFlow 2.21 and triton 3.8). The other order is safe, so
# triton (0.1 s) loads first when TensorFlow is not loaded yet.
if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton only matters to torch.compile, not here
        pass

from ..errors import install_hint  # noqa: E402 (needed by the message below)

try:
    import tensorflow as tf
    import keras
except ImportError as err:  # (tests/test_modeling_tf.py hides TensorFlow to check this message)
    raise ImportError(
        f"cvt's TensorFlow models need TensorFlow and Keras 3: {install_hint('tf')} ({err})") from err

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"cvt's TensorFlow models need Keras' TensorFlow backend, but Keras is using "
        f"{keras.backend.backend()!r} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}); "
        f"set KERAS_BACKEND=tensorflow before importing keras")

from ..checkpoints import convert
from ..checkpoints.check import load_state_dict_checked, match_prefix
from ..checkpoints.load import load_pretrained
from ..checkpoints.write import save_arrays_pretrained
from ..config import CvtConfig, conv_output_size, pixel_values_problem
from ..constants import LAYER_NORM_EPS
from ..outputs import ModelOutput, through_layers
from ..images.processing import CvtImageProcessor
from ..errors import CheckpointError, InvalidValueError

DATA_FORMATS = ("channels_first", "channels_last")
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1  # PyTorch's convention: running = (1 - m) * running + m * batch

# PyTorch layout -> TensorFlow layout of each kind of weight (and back). Depthwise kernels:
# PyTorch (C, 1, kh, kw) <-> (kh, kw, C, 1) as Keras' DepthwiseConv2D; the permutation is its own inverse.
LAYOUTS = {
    "same": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),  # (out, in) <-> (in, out)
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # (O,I,kh,kw) <-> (kh,kw,I,O)
    "depthwise": (lambda a: a.transpose(2, 3, 0, 1), lambda a: a.transpose(2, 3, 0, 1)),
}

# One rule per kind of variable: (Keras variable name, rank) -> (PyTorch name, layout). Every other
# variable (biases, BatchNorm's weight and statistics, cls tokens) has the same name and layout.
RULES = {
    ("kernel", 2): ("weight", "linear"),  # keras.layers.Dense
    ("kernel", 4): ("weight", "conv"),  # keras.layers.Conv2D
    ("depthwise_kernel", 4): ("weight", "depthwise"),  # DepthwiseConv below
    ("gamma", 1): ("weight", "same"),  # keras.layers.LayerNormalization
    ("beta", 1): ("bias", "same"),
}


def pytorch_key(path: str, rank: int) -> tuple[str, str]:
    """The PyTorch state-dict key and layout of a Keras variable of `rank` at `path` (below its
    model: 'cvt.encoder/stages.0/.../kernel'): the layers carry the PyTorch modules' names."""
    *layers, name = path.split("/")
    name, layout = RULES.get((name, rank), (name, "same"))
    return ".".join([*layers, name]), layout


def _pytorch_shape(var: Any, layout: str) -> tuple[int, ...]:
    """The PyTorch shape of a Keras variable stored in `layout` (a zero-copy view does the sums)."""
    return tuple(LAYOUTS[layout][1](np.broadcast_to(np.zeros((), np.int8), tuple(var.shape))).shape)


# ---------------------------------------------------------------------------------------- outputs
@dataclass
class TFBaseModelOutputWithCLSToken(ModelOutput):
    """`last_hidden_state` (B, C, H, W); `cls_token_value` (B, 1, C) when the last stage has one;
    `hidden_states`: one (B, C_s, H_s, W_s) map per stage, when asked for; `attentions`: each
    layer's attention probabilities when asked for, as in `cvt.CvtModel.forward`."""

    last_hidden_state: tf.Tensor
    cls_token_value: tf.Tensor | None = None
    hidden_states: tuple[tf.Tensor, ...] | None = None
    attentions: tuple[tf.Tensor, ...] | None = None


@dataclass
class TFImageClassifierOutputWithNoAttention(ModelOutput):
    """`loss` when labels were given, `logits` (B, num_labels), per-stage `hidden_states` and
    per-layer `attentions` when asked."""

    loss: tf.Tensor | None = None
    logits: tf.Tensor | None = None
    hidden_states: tuple[tf.Tensor, ...] | None = None
    attentions: tuple[tf.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------- small layers
def _dense_init(config: CvtConfig) -> keras.initializers.Initializer:
    return keras.initializers.TruncatedNormal(stddev=config.initializer_range)


def _conv_init() -> keras.initializers.Initializer:
    # PyTorch's Conv2d default, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with
    # fan_in = in_channels * kh * kw; Keras' fan_in of a dense (kh, kw, I, O) kernel is the same.
    return keras.initializers.VarianceScaling(scale=1 / 3, mode="fan_in", distribution="uniform")


def _dense(units: int, config: CvtConfig, name: str, use_bias: bool = True) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=use_bias, kernel_initializer=_dense_init(config), name=name)


def _layer_norm(name: str) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPS, name=name)


def _pytorch_pad(x: tf.Tensor, padding: int) -> tf.Tensor:
    """Zero padding on both sides of H and W, as PyTorch's `padding=` (TF 'same' is asymmetric)."""
    if padding == 0:
        return x
    return tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])


class DepthwiseConv(keras.layers.Layer):
    """A depthwise convolution without bias (`tf.nn.depthwise_conv2d`, as Keras' DepthwiseConv2D,
    which also backpropagates on CPU, unlike grouped convolutions). Its kernel is named
    `depthwise_kernel`, so the weight rules tell it from a dense convolution's."""

    def __init__(self, dim: int, kernel: int, stride: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim, self.kernel_size, self.stride = dim, kernel, stride

    def build(self, input_shape: Any = None) -> None:
        # PyTorch's depthwise Conv2d (groups = channels) has fan_in = kernel * kernel, so its default
        # is U(-1/kernel, 1/kernel); Keras would take fan_in = C * kernel * kernel from the shape.
        bound = 1 / math.sqrt(self.kernel_size * self.kernel_size)
        self.depthwise_kernel = self.add_weight(
            shape=(self.kernel_size, self.kernel_size, self.dim, 1), name="depthwise_kernel",
            initializer=keras.initializers.RandomUniform(-bound, bound))

    def call(self, x: tf.Tensor) -> tf.Tensor:
        kernel = tf.cast(self.depthwise_kernel, x.dtype)
        return tf.nn.depthwise_conv2d(x, kernel, [1, self.stride, self.stride, 1], "VALID")


class BatchNorm(keras.layers.Layer):
    """BatchNorm over the channels of NHWC maps with PyTorch's semantics: in training, normalise
    with the batch's (biased) statistics and update the running ones as
    `running = 0.9 * running + 0.1 * batch`, the variance unbiased (n / (n - 1)); otherwise
    normalise with the running statistics (also in training when the layer is frozen, as Keras'
    BatchNormalization). Variables are named as PyTorch's BatchNorm2d buffers."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = dim

    def build(self, input_shape: Any = None) -> None:
        dim = self.dim
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(dim,), initializer="zeros", name="bias")
        # under tf.distribute each replica updates the statistics from its own part of the batch
        # and the copies are averaged ("mean"), as DDP keeps one process's (see the README)
        self.running_mean = self.add_weight(shape=(dim,), initializer="zeros", trainable=False,
                                            aggregation="mean", name="running_mean")
        self.running_var = self.add_weight(shape=(dim,), initializer="ones", trainable=False,
                                           aggregation="mean", name="running_var")
        self.num_batches_tracked = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                                   trainable=False, aggregation="only_first_replica",
                                                   name="num_batches_tracked")

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if training and self.trainable:  # frozen (trainable = False): running statistics, as Keras'
            mean, var = tf.nn.moments(x, axes=[0, 1, 2])
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), x.dtype)
            m = BATCH_NORM_MOMENTUM
            self.running_mean.assign((1 - m) * self.running_mean + m * tf.stop_gradient(mean))
            unbiased = tf.stop_gradient(var) * count / tf.maximum(count - 1, 1)
            self.running_var.assign((1 - m) * self.running_var + m * unbiased)
            self.num_batches_tracked.assign_add(1)
        else:
            mean, var = self.running_mean, self.running_var
        return tf.nn.batch_normalization(x, mean, var, self.bias, self.weight, BATCH_NORM_EPS)


class DepthwiseConvBatchNorm(keras.layers.Layer):
    """Depthwise convolution with PyTorch's symmetric zero padding, then BatchNorm."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.padding = padding
        self.convolution = DepthwiseConv(dim, kernel, stride, name="convolution")
        self.normalization = BatchNorm(dim, name="normalization")

    def build(self, input_shape: Any = None) -> None:
        self.convolution.build(input_shape)
        self.normalization.build(input_shape)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.normalization(self.convolution(_pytorch_pad(x, self.padding)), training=training)


class AvgPool(keras.layers.Layer):
    """PyTorch's AvgPool2d(kernel, stride, padding, ceil_mode=True) with count_include_pad: zero
    padding counts in each window's divisor, the extra cells that ceil mode adds do not."""

    def __init__(self, kernel: int, stride: int, padding: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def call(self, x: tf.Tensor) -> tf.Tensor:
        k, s, p = self.kernel, self.stride, self.padding
        height, width = x.shape[1], x.shape[2]
        extra = [max(0, (conv_output_size(n, k, s, p, ceil=True) - 1) * s + k - (n + 2 * p))
                 for n in (height, width)]
        overhang = [[0, 0], [0, extra[0]], [0, extra[1]], [0, 0]]
        padded = tf.pad(_pytorch_pad(x, p), overhang)
        inside = tf.pad(tf.ones((1, height + 2 * p, width + 2 * p, 1), x.dtype), overhang)
        window_sums = tf.nn.avg_pool2d(padded, k, s, "VALID")  # both means share the factor k*k
        window_counts = tf.nn.avg_pool2d(inside, k, s, "VALID")
        return window_sums / window_counts


class DropPath(keras.layers.Layer):
    """Stochastic depth: zero a residual branch for a random subset of samples while training."""

    def __init__(self, rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
        mask = tf.floor(keep + tf.random.uniform(shape, dtype=x.dtype))
        return x * mask / keep


def quick_gelu(x: tf.Tensor) -> tf.Tensor:
    """x * sigmoid(1.702 x): the activation the original CvT code trained with."""
    return x * tf.sigmoid(1.702 * x)


def exact_gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact (erf) GELU, as transformers' CvT."""
    return tf.nn.gelu(x, approximate=False)


# ---------------------------------------------------------------------------------------- attention
class SpatialProjection(keras.layers.Layer):
    """The spatial half of a q/k/v projection, NHWC map -> tokens (B, N, C): 'dw_bn' depthwise
    conv + BatchNorm, 'avg' average pooling (ceil mode), 'linear' none."""

    def __init__(self, method: str, dim: int, kernel: int, stride: int, padding: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = dim
        if method == "dw_bn":
            self.convolution_projection = DepthwiseConvBatchNorm(
                dim, kernel, stride, padding, name="convolution_projection")
        elif method == "avg":
            self.convolution_projection = AvgPool(kernel, stride, padding, name="convolution_projection")
        else:
            self.convolution_projection = None

    def build(self, input_shape: Any = None) -> None:
        if self.convolution_projection is not None:
            self.convolution_projection.build((None, None, None, self.dim))

    def call(self, feature_map: tf.Tensor, training: bool = False) -> tf.Tensor:
        if isinstance(self.convolution_projection, DepthwiseConvBatchNorm):
            feature_map = self.convolution_projection(feature_map, training=training)
        elif self.convolution_projection is not None:
            feature_map = self.convolution_projection(feature_map)
        _, height, width, channels = feature_map.shape
        return tf.reshape(feature_map, [-1, height * width, channels])


class SelfAttention(keras.layers.Layer):
    """Convolutional projection of q/k/v, then multi-head attention scaled by embed_dim ** -0.5.
    A cls token skips the spatial projection and is prepended to q, k and v. With
    `output_attentions`, also returns the probabilities (B, heads, T_q, T_kv) before dropout."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dim, method = config.embed_dim[stage], config.qkv_projection_method[stage]
        kernel, bias = config.kernel_qkv[stage], config.qkv_bias[stage]
        self.dim, self.num_heads = dim, config.num_heads[stage]
        self.scale = dim**-0.5
        self.with_cls_token = config.cls_token[stage]
        self.convolution_projection_query = SpatialProjection(
            config.query_projection_method(stage), dim, kernel, config.stride_q[stage], config.padding_q[stage],
            name="convolution_projection_query")
        self.convolution_projection_key = SpatialProjection(
            method, dim, kernel, config.stride_kv[stage], config.padding_kv[stage],
            name="convolution_projection_key")
        self.convolution_projection_value = SpatialProjection(
            method, dim, kernel, config.stride_kv[stage], config.padding_kv[stage],
            name="convolution_projection_value")
        self.projection_query = _dense(dim, config, "projection_query", bias)
        self.projection_key = _dense(dim, config, "projection_key", bias)
        self.projection_value = _dense(dim, config, "projection_value", bias)
        self.attention_dropout = keras.layers.Dropout(config.attention_drop_rate[stage])

    def build(self, input_shape: Any = None) -> None:
        for name in ("query", "key", "value"):
            getattr(self, f"convolution_projection_{name}").build((None, None, None, self.dim))
        for name in ("query", "key", "value"):
            getattr(self, f"projection_{name}").build((None, self.dim))

    def call(self, x: tf.Tensor, height: int, width: int, training: bool = False,
             output_attentions: bool = False) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        tokens = x[:, 1:] if self.with_cls_token else x
        feature_map = tf.reshape(tokens, [-1, height, width, self.dim])
        q = self.convolution_projection_query(feature_map, training=training)
        k = self.convolution_projection_key(feature_map, training=training)
        v = self.convolution_projection_value(feature_map, training=training)
        if self.with_cls_token:
            cls = x[:, :1]
            q, k, v = tf.concat([cls, q], 1), tf.concat([cls, k], 1), tf.concat([cls, v], 1)
        q = self._split_heads(self.projection_query(q))  # (B, heads, T_q, d)
        k = self._split_heads(self.projection_key(k))  # (B, heads, T_kv, d)
        v = self._split_heads(self.projection_value(v))
        probabilities = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * self.scale, axis=-1)
        weights = self.attention_dropout(probabilities, training=training)
        out = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])  # (B, T_q, heads, d)
        out = tf.reshape(out, [-1, out.shape[1], self.dim])
        return (out, probabilities) if output_attentions else out

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.reshape(x, [-1, x.shape[1], self.num_heads, self.dim // self.num_heads])
        return tf.transpose(x, [0, 2, 1, 3])


# ---------------------------------------------------------------------------------------- layer, stage, encoder
class CvtLayer(keras.layers.Layer):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)). PyTorch's Attention
    and MLP containers have no Keras twins: their modules' names are dotted here."""

    def __init__(self, config: CvtConfig, stage: int, drop_path_rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dim, rate = config.embed_dim[stage], config.drop_rate[stage]
        self.dim, self.hidden = dim, int(dim * config.mlp_ratio[stage])
        self.attention = SelfAttention(config, stage, name="attention.attention")
        self.attention_output = _dense(dim, config, "attention.output.dense")
        self.intermediate = _dense(self.hidden, config, "intermediate.dense")
        self.output_dense = _dense(dim, config, "output.dense")
        self.layernorm_before = _layer_norm("layernorm_before")
        self.layernorm_after = _layer_norm("layernorm_after")
        self.activation = quick_gelu if config.hidden_act == "quick_gelu" else exact_gelu
        self.dropout = keras.layers.Dropout(rate)
        self.drop_path = DropPath(drop_path_rate)

    def build(self, input_shape: Any = None) -> None:
        tokens = (None, None, self.dim)
        self.attention.build(tokens)
        for layer in (self.attention_output, self.intermediate, self.layernorm_before, self.layernorm_after):
            layer.build(tokens)
        self.output_dense.build((None, None, self.hidden))
        self.drop_path.build(tokens)

    def call(self, x: tf.Tensor, height: int, width: int, training: bool = False,
             output_attentions: bool = False) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        """The new tokens, and with `output_attentions` the layer's attention probabilities."""
        attended = self.attention(self.layernorm_before(x), height=height, width=width, training=training,
                                  output_attentions=output_attentions)
        attended, probabilities = attended if output_attentions else (attended, None)
        attended = self.dropout(self.attention_output(attended), training=training)
        x = x + self.drop_path(attended, training=training)
        hidden = self.dropout(self.activation(self.intermediate(self.layernorm_after(x))), training=training)
        mlp = self.dropout(self.output_dense(hidden), training=training)
        x = x + self.drop_path(mlp, training=training)
        return (x, probabilities) if output_attentions else x


class CvtStage(keras.layers.Layer):
    """Convolutional token embedding (PyTorch's `embedding.convolution_embeddings`: a padded conv
    and LayerNorm), optional cls token, then `depth` layers."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config, self.stage = config, stage
        self.dim, self.padding = config.embed_dim[stage], config.patch_padding[stage]
        embedding = "embedding.convolution_embeddings"
        self.projection = keras.layers.Conv2D(
            self.dim, config.patch_sizes[stage], strides=config.patch_stride[stage], padding="valid",
            kernel_initializer=_conv_init(), name=f"{embedding}.projection")
        self.normalization = _layer_norm(f"{embedding}.normalization")
        self.embedding_dropout = keras.layers.Dropout(config.drop_rate[stage])
        self.layers = [CvtLayer(config, stage, rate, name=f"layers.{j}")
                       for j, rate in enumerate(config.layer_drop_path_rates(stage))]

    def build(self, input_shape: Any = None) -> None:
        config, stage = self.config, self.stage
        self.cls_token = self.add_weight(shape=(1, 1, self.dim), initializer=_dense_init(config),
                                         name="cls_token") if config.cls_token[stage] else None
        self.projection.build((None, None, None, config.stage_in_channels(stage)))
        self.normalization.build((None, None, self.dim))
        for layer in self.layers:
            layer.build((None, None, self.dim))

    def call(self, feature_map: tf.Tensor, training: bool = False, output_attentions: bool = False) -> tuple:
        """(B, H, W, C_in) -> (B, H', W', C) map, and the cls token (B, 1, C) or None; with
        `output_attentions` a third item, each layer's attention probabilities."""
        feature_map = self.projection(_pytorch_pad(feature_map, self.padding))
        _, height, width, _ = feature_map.shape
        x = self.normalization(tf.reshape(feature_map, [-1, height * width, self.dim]))
        x = self.embedding_dropout(x, training=training)
        if self.cls_token is not None:
            cls = tf.tile(tf.cast(self.cls_token, x.dtype), [tf.shape(x)[0], 1, 1])
            x = tf.concat([cls, x], axis=1)
        x, attentions = through_layers(self.layers, x, output_attentions, height=height, width=width,
                                       training=training)
        cls = None
        if self.cls_token is not None:
            cls, x = x[:, :1], x[:, 1:]
        feature_map = tf.reshape(x, [-1, height, width, self.dim])
        return (feature_map, cls, attentions) if output_attentions else (feature_map, cls)


class CvtEncoder(keras.layers.Layer):
    """The backbone: NCHW pixels -> per-stage NCHW feature maps and the last stage's cls token."""

    def __init__(self, config: CvtConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.stages = [CvtStage(config, s, name=f"stages.{s}") for s in range(config.num_stages)]

    def build(self, input_shape: Any = None) -> None:
        for stage in self.stages:
            stage.build()

    def call(self, pixel_values: tf.Tensor, output_hidden_states: bool = False,
             training: bool = False, output_attentions: bool = False) -> TFBaseModelOutputWithCLSToken:
        x = tf.transpose(pixel_values, [0, 2, 3, 1])  # NCHW -> NHWC
        maps, cls, attentions = [], None, ()
        for stage in self.stages:
            if output_attentions:
                x, cls, stage_attentions = stage(x, training=training, output_attentions=True)
                attentions += stage_attentions
            else:
                x, cls = stage(x, training=training)
            if output_hidden_states:
                maps.append(x)
        to_nchw = lambda m: tf.transpose(m, [0, 3, 1, 2])  # noqa: E731
        return TFBaseModelOutputWithCLSToken(
            last_hidden_state=to_nchw(x), cls_token_value=cls,
            hidden_states=tuple(to_nchw(m) for m in maps) if output_hidden_states else None,
            attentions=attentions if output_attentions else None)


# ---------------------------------------------------------------------------------------- models
class TFCvtPreTrainedModel(keras.Model):
    """Shared by both models: configuration, input checks, and weights in PyTorch's layout.

    `state_dict()` / `load_state_dict()` / `eval()` mirror the PyTorch names so that
    `cvt.checkpoints` (which builds, checks and saves models by those names) serves both frameworks.
    """

    base_model_prefix = "cvt"
    main_input_name = "pixel_values"
    preprocessing: dict | None = None  # as on the PyTorch models: written again by save_pretrained

    def __init__(self, config: CvtConfig, data_format: str = "channels_first", **kwargs: Any) -> None:
        if not isinstance(config, CvtConfig):
            raise TypeError(f"expected a cvt.CvtConfig, got {type(config).__name__}")
        if data_format not in DATA_FORMATS:
            raise InvalidValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
        super().__init__(**kwargs)
        self.config = config
        self.data_format = data_format

    # --------------------------------------------------------------- Keras: .keras files
    def get_config(self) -> dict[str, Any]:
        """What `from_config` rebuilds the model from: the CvtConfig, the data format and the
        preprocessing (the weights travel separately in a .keras file)."""
        return {"name": self.name, "trainable": self.trainable,
                "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
                "config": self.config.to_dict(), "data_format": self.data_format,
                "preprocessing": self.preprocessing}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TFCvtPreTrainedModel:
        config = dict(config)
        cvt_config = CvtConfig.from_dict(config.pop("config"))
        preprocessing = config.pop("preprocessing", None)
        config["dtype"] = keras.saving.deserialize_keras_object(config.get("dtype"))
        model = cls(cvt_config, **config)
        model.preprocessing = preprocessing
        return model

    # --------------------------------------------------------------- Keras: fit / evaluate / predict
    def main_output(self, outputs: ModelOutput) -> tf.Tensor:
        """The tensor Keras losses, metrics and `predict` see."""
        raise NotImplementedError

    def _keras_view(self, y_pred: Any) -> Any:
        """What Keras' losses, metrics and `predict` see of the model's output: its main tensor.
        (`call` returns the output dataclass, which Keras passes through its steps as it is.)"""
        if isinstance(y_pred, tuple):
            raise InvalidValueError("Keras' fit, evaluate and predict need the outputs as a dataclass: "
                                    "set model.config.return_dict = True")
        return self.main_output(y_pred) if isinstance(y_pred, ModelOutput) else y_pred

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                     training: bool = True) -> tf.Tensor:
        """The compiled Keras loss, on the main tensor."""
        return super().compute_loss(x, _labels_of(x, y), self._keras_view(y_pred), sample_weight,
                                    training=training)

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> dict[str, Any]:
        return super().compute_metrics(x, _labels_of(x, y), self._keras_view(y_pred), sample_weight)

    def predict_step(self, data: Any) -> tf.Tensor:
        return self._keras_view(super().predict_step(data))

    # --------------------------------------------------------------- Keras: SavedModel
    def serving_function(self, image_size: int | tuple[int, int] | None = None) -> Any:
        """A `tf.function` from a float32 pixel batch (any batch size; `image_size`, by default the
        model's preprocessing size; in `data_format`) to {name: output}, `logits` for a classifier."""
        if image_size is None:
            if self.preprocessing is None:
                raise InvalidValueError("this model carries no preprocessing, so its input size is unknown; "
                                 "give image_size")
            image_size = CvtImageProcessor.from_dict(self.preprocessing).size
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        channels = self.config.num_channels
        shape = (None, channels, height, width) if self.data_format == "channels_first" else (
            None, height, width, channels)

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="pixel_values")])
        def serve(pixel_values: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = self(pixel_values, return_dict=True, training=False)
            return {name: outputs[name] for name in outputs.keys()}

        return serve

    def export(self, filepath: str | os.PathLike, format: str = "tf_saved_model", verbose: bool | None = None,
               image_size: int | tuple[int, int] | None = None) -> None:
        """A SavedModel whose `serve` signature maps `pixel_values` (dynamic batch, `image_size`,
        float32) to the outputs (`logits`); `tf.saved_model.load(filepath).serve(x)` runs it.
        For ONNX and TFLite see `cvt export` (`cvt.engines.export`)."""
        if format != "tf_saved_model":
            raise InvalidValueError(f"{type(self).__name__}.export writes format='tf_saved_model' only, got "
                             f"{format!r}; for ONNX and TFLite use cvt.engines.export (cvt export --format)")
        archive = keras.export.ExportArchive()
        archive.track(self)
        archive.add_endpoint("serve", self.serving_function(image_size))
        archive.write_out(os.fspath(filepath), verbose=bool(verbose))

    # --------------------------------------------------------------- weights in PyTorch's layout
    def pytorch_variables(self) -> list[tuple[str, Any, str]]:
        """[(PyTorch state-dict key, Keras variable, layout)] of every variable, in PyTorch's key
        order (the layers are created in PyTorch's module order), keys read from the paths.
        (Keras' `weights`: the variables less random seeds and metrics.)"""
        below = f"{self.path}/"
        out = []
        for var in self.weights:
            if not var.path.startswith(below):
                raise RuntimeError(f"{var.path} is not below the model's path {self.path}: built elsewhere?")
            key, layout = pytorch_key(var.path.removeprefix(below), len(var.shape))
            out.append((key, var, layout))
        return out

    def pytorch_shapes(self) -> dict[str, tuple[int, ...]]:
        """PyTorch key -> PyTorch shape of every weight, without reading (copying) any of them."""
        return {key: _pytorch_shape(var, layout) for key, var, layout in self.pytorch_variables()}

    def pytorch_state_dict(self) -> dict[str, np.ndarray]:
        """The weights as numpy arrays under PyTorch keys and shapes (our CvT's and transformers')."""
        return {key: np.array(LAYOUTS[layout][1](np.asarray(var.numpy())), order="C")
                for key, var, layout in self.pytorch_variables()}

    def load_pytorch_state_dict(self, state_dict: dict[str, Any], source: str = "state dict") -> None:
        """Load PyTorch-layout weights (torch tensors or numpy arrays): transformers' keys with or
        without the 'cvt.' prefix, or an original microsoft/CvT state dict. Any missing,
        unexpected or mis-shaped key is a CheckpointError naming it (a missing classifier head
        is initialised, with a warning, as in the PyTorch model)."""
        if convert.is_original_checkpoint(state_dict):
            state_dict = convert.original_to_transformers(state_dict)
        shapes = self.pytorch_shapes()
        state_dict = match_prefix(dict(state_dict), shapes, source)
        load_state_dict_checked(self, state_dict, source, shapes=shapes)

    # PyTorch-named aliases used by cvt.checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """`pytorch_state_dict()` under PyTorch's name: numpy arrays under PyTorch keys and shapes."""
        return self.pytorch_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Assign PyTorch-layout arrays; with `strict`, every key must be present and known."""
        variables = {key: (var, layout) for key, var, layout in self.pytorch_variables()}
        missing = [k for k in variables if k not in state_dict]
        unexpected = [k for k in state_dict if k not in variables]
        if unexpected or (strict and missing):
            raise CheckpointError(f"{type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}")
        for key, value in state_dict.items():
            var, layout = variables[key]
            array = LAYOUTS[layout][0](_to_numpy(value))
            if tuple(array.shape) != tuple(var.shape):
                raise CheckpointError(
                    f"{key}: shape {tuple(_to_numpy(value).shape)} does not fit this model's "
                    f"{_pytorch_shape(var, layout)}")
            var.assign(array.astype(var.dtype))

    def eval(self) -> TFCvtPreTrainedModel:
        """No-op kept for symmetry with PyTorch: Keras picks the mode per call (`training=`)."""
        return self

    def num_parameters(self) -> int:
        """The trainable weights' count: the PyTorch model's parameters, while nothing is frozen."""
        return sum(int(np.prod(v.shape)) for v in self.trainable_variables)

    # --------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, config: CvtConfig | None = None,
                        ignore_mismatched_sizes: bool = False, **kwargs: Any):
        """Load exactly what the PyTorch `from_pretrained` loads: a local folder (transformers
        layout), a hub id, or an original CvT `.pth`. Keyword arguments that are config fields
        override the stored config (`num_labels=` with `ignore_mismatched_sizes=True` re-initialises
        only the classifier); hub arguments (`revision`, `cache_dir`, `token`, `local_files_only`,
        `subfolder`) are passed through, and `data_format="channels_last"` makes the model take
        NHWC pixels."""
        data_format = kwargs.pop("data_format", "channels_first")
        if data_format not in DATA_FORMATS:
            raise InvalidValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
        model = load_pretrained(cls, name_or_path, config=config,
                                        ignore_mismatched_sizes=ignore_mismatched_sizes, **kwargs)
        model.data_format = data_format
        return model

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + model.safetensors in the PyTorch layout: loadable by this class,
        cvt's PyTorch models and transformers."""
        save_arrays_pretrained(folder, self.pytorch_state_dict(), self.config,
                                       architecture=type(self).__name__.removeprefix("TF"),
                                       preprocessing=getattr(self, "preprocessing", None))

    # --------------------------------------------------------------- inputs
    def _build_now(self) -> None:
        """Build at construction, as PyTorch modules have their weights (to load, get or set them
        at once); every variable is created in PyTorch's order, whatever the input's size."""
        self.build()

    def _output_settings(self, output_hidden_states: bool | None, return_dict: bool | None) -> tuple[bool, bool]:
        """A call's output_hidden_states and return_dict, the config's where not given."""
        return (self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
                self.config.return_dict if return_dict is None else return_dict)

    def _inputs(self, pixel_values: Any, labels: Any, training: bool) -> tuple[tf.Tensor, Any]:
        """The checked pixel values and the labels: a dict batch, as Keras passes it, holds both."""
        if isinstance(pixel_values, dict):
            labels = pixel_values.get("labels") if labels is None else labels
            pixel_values = _pixel_values_of(pixel_values)
        return self._check_pixel_values(pixel_values, training), labels

    def _check_pixel_values(self, pixel_values: Any, training: bool) -> tf.Tensor:
        """The PyTorch model's input checks, returning the tensor cast to the layers' compute dtype."""
        try:
            pixel_values = tf.convert_to_tensor(pixel_values)
        except (TypeError, ValueError) as err:
            raise TypeError(f"pixel_values must be a tensor or array, got {type(pixel_values).__name__}: {err}") from None
        if not pixel_values.dtype.is_floating:
            raise InvalidValueError(
                f"pixel_values must be a floating-point tensor, got {pixel_values.dtype.name}; convert "
                f"images with cvt.CvtImageProcessor(..., return_tensors='np') or tf.cast (and normalise)")
        if self.data_format == "channels_last" and pixel_values.shape.rank == 4:
            pixel_values = tf.transpose(pixel_values, [0, 3, 1, 2])  # the layers take NCHW
        shape = tuple(pixel_values.shape)
        if len(shape) == 4 and None in shape[1:]:
            raise InvalidValueError(f"pixel_values needs a known channel count, height and width, got {shape}")
        problem = pixel_values_problem(self.config, shape, training)
        if problem:
            raise InvalidValueError(problem)
        return tf.cast(pixel_values, self.compute_dtype)


def _pixel_values_of(batch: dict[str, Any]) -> Any:
    if "pixel_values" not in batch:
        raise InvalidValueError(f"a dict batch needs 'pixel_values' (and optionally 'labels'), got keys {sorted(batch)}")
    return batch["pixel_values"]


def _labels_of(x: Any, y: Any) -> Any:
    """Keras' targets: `y` of an (x, y) batch, else the `labels` of a dict batch."""
    return x.get("labels") if y is None and isinstance(x, dict) else y


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array, a TF tensor or a torch tensor (without importing torch)."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16
        return value.numpy()
    return np.asarray(value)


@keras.saving.register_keras_serializable(package="cvt")
class TFCvtModel(TFCvtPreTrainedModel):
    """The CvT backbone: per-stage feature maps and the last stage's cls token."""

    def __init__(self, config: CvtConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.encoder = CvtEncoder(config, name="encoder")
        self._build_now()

    def build(self, input_shape: Any = None) -> None:
        self.encoder.build(input_shape)

    def call(self, pixel_values: Any, output_hidden_states: bool | None = None,
             return_dict: bool | None = None, training: bool = False, output_attentions: bool = False
             ) -> TFBaseModelOutputWithCLSToken | tuple:
        """As `CvtModel.forward`: NCHW pixels (NHWC with `data_format="channels_last"`) to the
        last stage's map, the cls token and, on request, every stage's map and attention."""
        pixel_values, _ = self._inputs(pixel_values, None, training)
        output_hidden_states, return_dict = self._output_settings(output_hidden_states, return_dict)
        out = self.encoder(pixel_values, output_hidden_states=output_hidden_states, training=training,
                           output_attentions=output_attentions)
        return out if return_dict else out.to_tuple()

    def main_output(self, outputs: TFBaseModelOutputWithCLSToken) -> tf.Tensor:
        return outputs.last_hidden_state


@keras.saving.register_keras_serializable(package="cvt")
class TFCvtForImageClassification(TFCvtPreTrainedModel):
    """CvT backbone + final LayerNorm + linear classifier over the cls token (or mean-pooled
    tokens). The backbone, PyTorch's `cvt` (a CvtModel holding an encoder), is the encoder
    layer `cvt.encoder`."""

    def __init__(self, config: CvtConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.cvt = CvtEncoder(config, name="cvt.encoder")
        self.layernorm = _layer_norm("layernorm")
        self.classifier = _dense(config.num_labels, config, "classifier") if config.num_labels > 0 else None
        self._build_now()

    def build(self, input_shape: Any = None) -> None:
        self.cvt.build(input_shape)
        features = (None, self.config.embed_dim[-1])
        self.layernorm.build(features)
        if self.classifier is not None:
            self.classifier.build(features)

    def call(self, pixel_values: Any, labels: Any = None, output_hidden_states: bool | None = None,
             return_dict: bool | None = None, training: bool = False, output_attentions: bool = False
             ) -> TFImageClassifierOutputWithNoAttention | tuple:
        """As `CvtForImageClassification.forward`: logits, and with `labels` the loss of the
        PyTorch model's `problem_type` rules."""
        pixel_values, labels = self._inputs(pixel_values, labels, training)
        output_hidden_states, return_dict = self._output_settings(output_hidden_states, return_dict)
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states, training=training,
                           output_attentions=output_attentions)
        if outputs.cls_token_value is not None:
            features = self.layernorm(outputs.cls_token_value)[:, 0]
        else:
            last = outputs.last_hidden_state  # (B, C, H, W)
            tokens = tf.reshape(tf.transpose(last, [0, 2, 3, 1]), [-1, last.shape[2] * last.shape[3], last.shape[1]])
            features = tf.reduce_mean(self.layernorm(tokens), axis=1)
        logits = self.classifier(features) if self.classifier is not None else features
        loss = self.classification_loss(logits, labels) if labels is not None else None
        out = TFImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()

    def main_output(self, outputs: TFImageClassifierOutputWithNoAttention) -> tf.Tensor:
        return outputs.logits

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                     training: bool = True) -> tf.Tensor:
        """Keras' loss: the one given to `compile`, else (labels in the batch, as transformers v4's
        TF models) the model's own `classification_loss`."""
        y = _labels_of(x, y)
        if self.loss is not None or y is None:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        y_pred = self._keras_view(y_pred)
        if sample_weight is not None:
            raise InvalidValueError("sample weights need a Keras loss: compile(loss=...) (the model's own "
                             "loss weighs every sample alike)")
        loss = self.classification_loss(y_pred, y) + sum(self.losses)
        # Keras sums the replicas' gradients under tf.distribute: each replica's share is 1/n
        return loss / tf.distribute.get_strategy().num_replicas_in_sync

    def classification_loss(self, logits: tf.Tensor, labels: Any) -> tf.Tensor:
        """The PyTorch model's `loss`, chosen by the same `config.loss_problem` rule: MSE for
        regression, cross-entropy for class indices (ignoring -100, as PyTorch), BCE-with-logits
        for multi-hot labels. (Not named `loss`: Keras models own that attribute.)"""
        labels = tf.convert_to_tensor(labels)
        num_labels = self.config.num_labels
        problem = self.config.loss_problem(labels.dtype in (tf.int64, tf.int32))
        if problem == "regression":
            labels = tf.cast(labels, logits.dtype)
            if num_labels == 1:
                return tf.reduce_mean(tf.square(tf.squeeze(logits) - tf.squeeze(labels)))
            return tf.reduce_mean(tf.square(logits - labels))
        if problem == "single_label_classification":
            if not labels.dtype.is_integer:
                raise InvalidValueError(
                    f"single-label classification needs integer class indices, got {labels.dtype.name} labels")
            labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
            keep = labels != -100
            per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.where(keep, labels, 0), tf.reshape(logits, [-1, num_labels]))
            kept = tf.cast(keep, logits.dtype)
            return tf.reduce_sum(per_sample * kept) / tf.reduce_sum(kept)
        if tuple(labels.shape) != tuple(logits.shape):
            raise InvalidValueError(
                f"multi-label classification needs float multi-hot labels shaped like the logits "
                f"{tuple(logits.shape)}, got {labels.dtype.name} labels of shape {tuple(labels.shape)} "
                f"(int64/int32 class indices select single-label cross-entropy)")
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
            tf.cast(labels, logits.dtype), logits))
