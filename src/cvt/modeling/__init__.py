"""CvT in PyTorch, top to bottom: small blocks, one layer, one stage, the backbone, the classifier.

Module attribute names mirror transformers' CvT, so `state_dict()` keys and shapes are identical
(`cvt.encoder.stages.{s}.layers.{l}.attention.attention.projection_query.weight`, ...). Inside,
activations travel as tokens `(B, N, C)`; a token tensor viewed as `(B, C, H, W)` is a
channels-last feature map, so the convolutions need no layout copies. Attention runs through
`scaled_dot_product_attention` with CvT's own scale, `embed_dim ** -0.5` (not the head-size
default).

The model is plain: every module's `forward` is its computation, so hooks, adapters swapped into
a layer, quantisation, `torch.func` and FLOP counters see what really runs. Faster inference
(BatchNorm folded, in-place residuals, worker threads, other runtimes) lives in `cvt.engines`,
which checks itself against this model.

Where transformers' port is wrong, this follows the original microsoft/CvT code: 'avg' and
'linear' projections work, a cls token may sit in any stage (sized by that stage), a model
without a cls token classifies from mean-pooled normalised tokens, and stochastic depth ramps
linearly over each stage's layers and drops only the residual branch.

Model code never reads files: `from_pretrained` / `save_pretrained` delegate to `cvt.checkpoints`.
Making models by name (`cvt.load`, `create_model`) and the feature backbone live in
`cvt.modeling.factory`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from . import torch_registry
from ..checkpoints.load import load_pretrained
from ..checkpoints.write import save_staged
from ..config import CvtConfig, pixel_values_problem
from ..outputs import through_layers
from ..constants import LAYER_NORM_EPS
from ..errors import InvalidValueError

# ---------------------------------------------------------------------------------------- outputs
# transformers' `ModelOutput`: readable by attribute, key or position (None fields skipped), and
# a pytree node, so torch.export and torch.compile see through it
@dataclass
class BaseModelOutputWithCLSToken(ModelOutput):
    """`last_hidden_state` (B, C, H, W); `cls_token_value` (B, 1, C) when the last stage has one;
    `hidden_states`: one (B, C_s, H_s, W_s) map per stage, when asked for; `attentions`: see
    `CvtModel.forward`."""

    last_hidden_state: Tensor | None = None
    cls_token_value: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    """`loss` when labels were given, `logits` (B, num_labels), per-stage `hidden_states` and
    per-layer `attentions` when asked."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


# transformers' CvT names its classifier's output so; kept for code written against that name
ImageClassifierOutputWithNoAttention = ImageClassifierOutput

# cvt's attention FLOP formulas for the CPU: its one write into torch's registries
torch_registry.register()


# ---------------------------------------------------------------------------------------- blocks
def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens (B, H*W, C) as a dense channels-last map (B, C, H, W): a view when the tokens are
    dense (even one image behind a cls token), else one copy. Convolutions copy their input on
    every call unless its strides are exactly those of a dense channels-last map."""
    batch, _, dim = tokens.shape
    feature_map = tokens.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    return feature_map.contiguous(memory_format=torch.channels_last)


class GELU(nn.Module):
    """Exact (erf) GELU, as transformers' CvT."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the original CvT code trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else GELU()


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


class ConvEmbedding(nn.Module):
    """Convolutional token embedding: strided conv, then LayerNorm over channels per position."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_channels, dim, kernel, stride, padding)
        self.normalization = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, feature_map: Tensor) -> tuple[Tensor, int, int]:
        x = self.projection(feature_map)
        height, width = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C); contiguous for channels-last input
        return self.normalization(tokens), height, width


class Embedding(nn.Module):
    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int, padding: int,
                 drop_rate: float) -> None:
        super().__init__()
        self.convolution_embeddings = ConvEmbedding(in_channels, dim, kernel, stride, padding)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, feature_map: Tensor) -> tuple[Tensor, int, int]:
        tokens, height, width = self.convolution_embeddings(feature_map)
        return self.dropout(tokens), height, width


class DepthwiseConvBatchNorm(nn.Module):
    """Depthwise convolution, then BatchNorm ('dw_bn' projection)."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(dim, dim, kernel, stride, padding, groups=dim, bias=False)
        self.normalization = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalization(self.convolution(x))


class SpatialProjection(nn.Module):
    """The spatial half of a q/k/v projection; turns a (B, C, H, W) map into tokens (B, N, C).

    'dw_bn': depthwise conv + BatchNorm; 'avg': average pooling (ceil mode, as the original);
    'linear': no spatial operation.
    """

    def __init__(self, method: str, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        if method == "dw_bn":
            self.convolution_projection = DepthwiseConvBatchNorm(dim, kernel, stride, padding)
        elif method == "avg":
            self.convolution_projection = nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)
        else:
            self.convolution_projection = nn.Identity()

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.convolution_projection(feature_map).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Convolutional projection of q/k/v, then multi-head attention scaled by embed_dim ** -0.5.

    A cls token skips the spatial projection and is prepended to q, k and v before the linear
    projections, so it both attends and is attended to.

    With `output_attentions`, also returns the attention probabilities (B, heads, T_q, T_kv),
    softmax(q k^T * scale) before attention dropout, computed beside the attention itself, whose
    output stays bit-identical; keys come from the key grid (`config.kv_grid`), cls first.
    """

    def __init__(self, config: CvtConfig, stage: int) -> None:
        super().__init__()
        dim, method = config.embed_dim[stage], config.qkv_projection_method[stage]
        kernel, bias = config.kernel_qkv[stage], config.qkv_bias[stage]
        self.num_heads = config.num_heads[stage]
        self.scale = dim**-0.5
        self.with_cls_token = config.cls_token[stage]
        self.attention_drop_rate = config.attention_drop_rate[stage]
        self.convolution_projection_query = SpatialProjection(
            config.query_projection_method(stage), dim, kernel, config.stride_q[stage], config.padding_q[stage])
        self.convolution_projection_key = SpatialProjection(
            method, dim, kernel, config.stride_kv[stage], config.padding_kv[stage])
        self.convolution_projection_value = SpatialProjection(
            method, dim, kernel, config.stride_kv[stage], config.padding_kv[stage])
        self.projection_query = nn.Linear(dim, dim, bias=bias)
        self.projection_key = nn.Linear(dim, dim, bias=bias)
        self.projection_value = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, height: int, width: int,
                output_attentions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        batch, _, dim = x.shape
        feature_map = tokens_to_map(x[:, 1:] if self.with_cls_token else x, height, width)
        q = self.convolution_projection_query(feature_map)
        k = self.convolution_projection_key(feature_map)
        v = self.convolution_projection_value(feature_map)
        if self.with_cls_token:
            cls = x[:, :1]
            q, k, v = torch.cat((cls, q), 1), torch.cat((cls, k), 1), torch.cat((cls, v), 1)
        heads = (batch, -1, self.num_heads, dim // self.num_heads)
        q = self.projection_query(q).view(heads).transpose(1, 2)  # (B, heads, T_q, d)
        k = self.projection_key(k).view(heads).transpose(1, 2)  # (B, heads, T_kv, d)
        v = self.projection_value(v).view(heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_drop_rate if self.training else 0.0, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, -1, dim)
        if output_attentions:
            return out, torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return out


class Attention(nn.Module):
    def __init__(self, config: CvtConfig, stage: int) -> None:
        super().__init__()
        dim = config.embed_dim[stage]
        self.attention = SelfAttention(config, stage)
        self.output = nn.Sequential(OrderedDict(
            dense=nn.Linear(dim, dim), dropout=nn.Dropout(config.drop_rate[stage])))

    def forward(self, x: Tensor, height: int, width: int,
                output_attentions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if output_attentions:
            out, probabilities = self.attention(x, height, width, output_attentions=True)
            return self.output(out), probabilities
        return self.output(self.attention(x, height, width))


class CvtLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)). A transformers
    `GradientCheckpointingLayer`: while training with activation checkpointing on, its forward
    runs through `_gradient_checkpointing_func` (`checkpoint_keeping_statistics`)."""

    def __init__(self, config: CvtConfig, stage: int, drop_path_rate: float) -> None:
        super().__init__()
        dim, rate = config.embed_dim[stage], config.drop_rate[stage]
        hidden = int(dim * config.mlp_ratio[stage])
        self.attention = Attention(config, stage)
        self.intermediate = nn.Sequential(OrderedDict(
            dense=nn.Linear(dim, hidden), activation=make_activation(config.hidden_act),
            dropout=nn.Dropout(rate)))
        self.output = nn.Sequential(OrderedDict(dense=nn.Linear(hidden, dim), dropout=nn.Dropout(rate)))
        self.drop_path = DropPath(drop_path_rate)
        self.layernorm_before = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.layernorm_after = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, height: int, width: int,
                output_attentions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The new tokens, and with `output_attentions` the layer's attention probabilities."""
        attended = self.attention(self.layernorm_before(x), height, width, output_attentions)
        attended, probabilities = attended if output_attentions else (attended, None)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.output(self.intermediate(self.layernorm_after(x))))
        return (x, probabilities) if output_attentions else x


@contextlib.contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Gradient checkpointing re-runs a layer's forward in backward; its BatchNorms must not
    update their running statistics a second time, so they are restored afterwards."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def checkpoint_keeping_statistics(layer: nn.Module, function: Any, *args: Any, offload: bool = False,
                                  **checkpoint_kwargs: Any) -> Any:
    """A layer's forward under torch's non-reentrant checkpoint, its BatchNorm statistics
    restored after the recomputation (so they are updated once, as without checkpointing);
    with `offload` the activations it saves wait in host memory."""
    def context() -> tuple:
        return contextlib.nullcontext(), _batchnorm_statistics_kept(layer)

    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload \
            else contextlib.nullcontext():
        return checkpoint(function, *args, use_reentrant=False, context_fn=context, **checkpoint_kwargs)


class CvtStage(nn.Module):
    """Convolutional token embedding, optional cls token, then `depth` layers."""

    def __init__(self, config: CvtConfig, stage: int) -> None:
        super().__init__()
        dim = config.embed_dim[stage]
        if config.cls_token[stage]:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.cls_token = None
        self.embedding = Embedding(
            config.stage_in_channels(stage), dim, config.patch_sizes[stage], config.patch_stride[stage],
            config.patch_padding[stage], config.drop_rate[stage])
        self.layers = nn.ModuleList(CvtLayer(config, stage, rate)
                                    for rate in config.layer_drop_path_rates(stage))

    def forward(self, feature_map: Tensor, output_attentions: bool = False) -> tuple:
        """(B, C_in, H, W) -> (B, C, H', W') channels-last map, and the cls token (B, 1, C) or
        None; with `output_attentions` a third item, each layer's attention probabilities."""
        x, height, width = self.embedding(feature_map)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x, attentions = through_layers(self.layers, x, output_attentions, height=height, width=width)
        cls = None
        if self.cls_token is not None:
            cls, x = x[:, :1], x[:, 1:]
        feature_map = tokens_to_map(x, height, width)
        return (feature_map, cls, attentions) if output_attentions else (feature_map, cls)


class CvtEncoder(nn.Module):
    def __init__(self, config: CvtConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList(CvtStage(config, s) for s in range(config.num_stages))


# ---------------------------------------------------------------------------------------- models
class CvtPreTrainedModel(PreTrainedModel):
    """Shared by both models: a transformers `PreTrainedModel` (loading, saving, `device`,
    `dtype`, pipelines, `Trainer`, PEFT), with CvT's weight initialisation and cvt's checked
    loading in front of transformers' own."""

    config_class = CvtConfig
    base_model_prefix = "cvt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CvtLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # attention always runs through scaled_dot_product_attention
    # preprocessor_config.json contents the weights came with (a variant's, a folder's), written
    # again by save_pretrained; None when unknown
    preprocessing: dict | None = None

    def __init__(self, config: CvtConfig) -> None:
        config = CvtConfig.of(config)
        config.check()
        super().__init__(config)

    def _init_weights(self, module: nn.Module) -> None:
        """The original code's initialisation: truncated normal for Linear layers and cls tokens,
        zero biases, unit norms with fresh BatchNorm statistics; convolutions get PyTorch's
        default. Called by transformers for every module that was not loaded (and by
        `init_weights()`, e.g. after building on the meta device and `to_empty`)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            module.reset_parameters()
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                nn.init.zeros_(module.running_mean)
                nn.init.ones_(module.running_var)
                nn.init.zeros_(module.num_batches_tracked)
        elif isinstance(module, CvtStage) and module.cls_token is not None:
            nn.init.trunc_normal_(module.cls_token, std=std)

    @property
    def num_features(self) -> int:
        """Width of the pooled features the head sees (timm's name): the last stage's."""
        return self.config.embed_dim[-1]

    def _set_config(self, config: CvtConfig) -> None:
        """Give this model and the models inside it one new config (they share it)."""
        for module in self.modules():
            if isinstance(module, CvtPreTrainedModel):
                module.config = config

    def _pool(self, tokens: Tensor) -> Tensor:
        """(B, T, C) final tokens -> (B, C): the cls token where the last stage has one, else the
        mean of the tokens (the original code's pooling)."""
        return tokens[:, 0] if self.config.cls_token[-1] else tokens.mean(dim=1)

    def adapt_input_channels(self, in_chans: int) -> None:
        """Take `in_chans`-channel images with the first convolution's trained weights, as timm
        adapts pretrained weights: one channel gets the sum over the trained channels; more get
        them repeated in turn and scaled by trained / in_chans, so the activations keep their scale."""
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise InvalidValueError(f"in_chans must be a positive number of image channels, got {in_chans!r}")
        conv = next(m for m in self.modules() if isinstance(m, ConvEmbedding)).projection
        weight, trained = conv.weight.detach(), conv.in_channels
        if in_chans == trained:
            return
        if in_chans == 1:
            adapted = weight.sum(dim=1, keepdim=True)
        else:
            adapted = weight.repeat(1, math.ceil(in_chans / trained), 1, 1)[:, :in_chans] * (trained / in_chans)
        conv.weight = nn.Parameter(adapted.contiguous())
        conv.in_channels = in_chans
        self._set_config(self.config.replace(num_channels=in_chans))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward instead of keeping them (timm's name):
        training memory falls to about a layer's worth per stage, for one more forward pass.
        Outputs, gradients and BatchNorm statistics are those of the model without it."""
        if enable:
            self.activation_checkpointing_enable()
        else:
            self.activation_checkpointing_disable()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' switch for activation (gradient) checkpointing while training, on every
        `every_n_layers`-th layer. cvt always recomputes non-reentrantly with the BatchNorm
        statistics kept (`checkpoint_keeping_statistics`): a `use_reentrant` setting is not read
        (only the non-reentrant form keeps the statistics and needs no input that requires
        grad); other `activation_checkpointing_kwargs` go to torch's checkpoint."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise InvalidValueError(f"every_n_layers must be a positive whole number, got {every_n_layers!r}")
        kwargs = {k: v for k, v in (activation_checkpointing_kwargs or {}).items() if k != "use_reentrant"}
        for index, layer in enumerate(m for m in self.modules() if isinstance(m, CvtLayer)):
            layer.gradient_checkpointing = index % every_n_layers == 0
            layer._gradient_checkpointing_func = functools.partial(
                checkpoint_keeping_statistics, layer, offload=offload, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Every layer keeps its activations again."""
        for layer in self.modules():
            if isinstance(layer, CvtLayer):
                layer.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      **kwargs: Any) -> None:
        """transformers' older name for `activation_checkpointing_enable` (Trainer calls it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """transformers' older name for `activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def _check_pixel_values(self, pixel_values: Any) -> None:
        """Turn the commonest input mistakes into one clear error instead of a deep torch one."""
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise InvalidValueError(
                f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}; convert "
                f"images with cvt.CvtImageProcessor or tensor.float() (and normalise)")
        problem = pixel_values_problem(self.config, tuple(pixel_values.shape), self.training)
        if problem:
            raise InvalidValueError(problem)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        *model_args: Any, config: CvtConfig | None = None,
                        check_weights: bool = True, **kwargs: Any):
        """transformers' `from_pretrained`, for every checkpoint cvt reads: a local folder
        (transformers layout, `subfolder=`), a hub id, a variant name ("cvt-13"), or an original
        microsoft/CvT `.pth`.

        cvt reads and checks the files first (the config against the weights' headers, every key
        and shape, integer, NaN/inf and negative-variance weights unless `check_weights=False`),
        then hands the checked state dict to transformers' loading, which takes its usual
        arguments (`dtype`, `device_map`, `output_loading_info`, `attn_implementation`, ...).
        Keyword arguments that are config fields (`num_labels=`, `hidden_act=`, ...) override
        the stored config; a head of another size needs `ignore_mismatched_sizes=True`.
        """
        if model_args:
            raise TypeError(f"{cls.__name__} takes no positional model arguments, got {len(model_args)}")
        return load_pretrained(cls, pretrained_model_name_or_path, config=config,
                                       check_weights=check_weights, build=build_with_transformers, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """transformers' `save_pretrained` (`max_shard_size=`, `safe_serialization=`, ...),
        loadable here and by transformers, plus the model's preprocessor_config.json when it
        knows its preprocessing. Files are staged beside the folder and each moved in whole; a
        folder holding other weights (which the new ones would leave stale) is refused first."""
        save_staged(save_directory, lambda staging: super(CvtPreTrainedModel, self).save_pretrained(
            staging, **kwargs), self.config, self.preprocessing)


def build_with_transformers(cls: type[CvtPreTrainedModel], config: CvtConfig, state_dict: dict[str, Tensor],
                        source: Any, **kwargs: Any) -> CvtPreTrainedModel:
    """transformers' loading of a state dict cvt has checked (dtype, device map, loading info,
    a re-initialised head with `ignore_mismatched_sizes`)."""
    return super(CvtPreTrainedModel, cls).from_pretrained(None, config=config, state_dict=state_dict, **kwargs)


class CvtModel(CvtPreTrainedModel):
    """The CvT backbone: per-stage feature maps and the last stage's cls token."""

    def __init__(self, config: CvtConfig) -> None:
        super().__init__(config)
        config = self.config  # a cvt config, whichever CvT config was given
        self.encoder = CvtEncoder(config)
        self.post_init()

    def forward(self, pixel_values: Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None,
                output_attentions: bool | None = None) -> BaseModelOutputWithCLSToken | tuple:
        """Each flag left None takes the config's value. `hidden_states` are the stage outputs
        the next stage reads (channels-last views, as transformers'), so gradients reach them.
        With `output_attentions`, `attentions` holds every layer's attention probabilities,
        stage by stage in order (`sum(config.depth)` tensors): (B, heads, T_q, T_kv), queries on
        the stage's token grid and keys on its key grid (`cvt.config.kv_grid`, smaller when
        `stride_kv > 1`), both row-major with the cls token first where the stage has one. Each
        row sums to 1 over the keys; the other outputs are unchanged."""
        self._check_pixel_values(pixel_values)
        output_hidden_states = _flag(output_hidden_states, self.config.output_hidden_states)
        output_attentions = _flag(output_attentions, self.config.output_attentions)
        last, cls, maps, attentions = self._encode(pixel_values, output_hidden_states, output_attentions)
        out = BaseModelOutputWithCLSToken(last_hidden_state=last, cls_token_value=cls,
                                          hidden_states=maps, attentions=attentions)
        return out if _flag(return_dict, self.config.return_dict) else out.to_tuple()

    def _encode(self, pixel_values: Tensor, every_stage: bool, output_attentions: bool
                ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """The last stage's contiguous (B, C, H, W) map and cls token, every stage's map (when
        asked) and the layers' attention probabilities (when asked). Inputs of another floating
        dtype (fp16/bf16 into an fp32 model) are cast to the model's."""
        x = pixel_values.to(next(self.parameters()).dtype).contiguous(memory_format=torch.channels_last)
        maps, cls, attentions = (), None, ()
        for stage in self.encoder.stages:
            if output_attentions:
                x, cls, stage_attentions = stage(x, output_attentions=True)
                attentions += stage_attentions
            else:
                x, cls = stage(x)
            if every_stage:
                maps += (x,)
        return (x.contiguous(), cls, maps if every_stage else None,
                attentions if output_attentions else None)

    # timm's model interface -------------------------------------------------------------------
    num_classes = 0  # the backbone has no classifier

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        """The last stage's tokens (B, T, C), its cls token first where it has one (the backbone
        has no final norm; `CvtForImageClassification.forward_features` adds it)."""
        return _final_tokens(self(pixel_values, return_dict=True))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled features (B, num_features) of `forward_features`' tokens (there is no classifier)."""
        return self._pool(tokens)

    def reset_classifier(self, num_classes: int) -> None:
        """The backbone has no classifier: only 0 classes (its pooled features) is possible."""
        if num_classes != 0:
            raise InvalidValueError(f"CvtModel is the backbone without a classifier and cannot get "
                             f"{num_classes} classes; use CvtForImageClassification (or "
                             f"cvt.create_model(name, num_classes={num_classes}))")

    def forward_intermediates(self, pixel_values: Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-stage feature maps (B, C_s, H_s, W_s) of the stages `indices` names (None: all; an
        int n: the last n; else stage numbers, negative from the end), and unless
        `intermediates_only` first `forward_features`' tokens: `(final, [maps])`, as timm."""
        stages = select_stages(indices, self.config.num_stages)
        out = self(pixel_values, output_hidden_states=True, return_dict=True)
        maps = [out.hidden_states[s] for s in stages]
        return maps if intermediates_only else (_final_tokens(out), maps)


def _flag(value: bool | None, default: bool | None) -> bool:
    """A forward flag: the call's value, else the config's (None there means False)."""
    return bool(default) if value is None else bool(value)


def _final_tokens(outputs: BaseModelOutputWithCLSToken) -> Tensor:
    """The last stage's map and cls token as tokens (B, T, C), the cls token first."""
    tokens = outputs.last_hidden_state.flatten(2).transpose(1, 2)
    if outputs.cls_token_value is None:
        return tokens
    return torch.cat((outputs.cls_token_value, tokens), dim=1)


def select_stages(indices: int | Sequence[int] | None, num_stages: int) -> list[int]:
    """Stage numbers as timm's `indices` / `out_indices` name them: None for all, an int n for
    the last n, else a sequence of stage numbers (negative counts from the end), kept in order."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= num_stages:
            raise InvalidValueError(f"indices={indices} asks for the last {indices} stages; the model has "
                             f"{num_stages} (1 to {num_stages})")
        return list(range(num_stages - indices, num_stages))
    stages = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_stages <= index < num_stages:
            raise InvalidValueError(f"stage index {index!r} is out of range for a model with {num_stages} "
                             f"stages (0 to {num_stages - 1}, or negative from the end)")
        stages.append(index % num_stages)
    if not stages:
        raise InvalidValueError("indices names no stage; give None (all stages), a count or stage numbers")
    return stages


class CvtForImageClassification(CvtPreTrainedModel):
    """CvT backbone + final LayerNorm + linear classifier over the cls token (or mean-pooled tokens)."""

    def __init__(self, config: CvtConfig) -> None:
        super().__init__(config)
        config = self.config  # a cvt config, whichever CvT config was given
        self.cvt = CvtModel(config)
        dim = config.embed_dim[-1]
        self.layernorm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.classifier = nn.Linear(dim, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                output_attentions: bool | None = None) -> ImageClassifierOutput | tuple:
        """The flags as `CvtModel.forward`'s; the logits are those computed without them."""
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states, return_dict=True,
                           output_attentions=output_attentions)
        logits = self.forward_head(self.layernorm(_final_tokens(outputs)))
        loss = self.loss(logits, labels) if labels is not None else None
        out = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return out if _flag(return_dict, self.config.return_dict) else out.to_tuple()

    # timm's model interface -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_labels

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        """The last stage's tokens (B, T, C) after the final norm, the cls token first where
        present, as timm's ViTs return them: `forward_head(forward_features(x))` is the logits."""
        return self.layernorm(self.cvt.forward_features(pixel_values))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits (B, num_classes) from `forward_features`' tokens; with `pre_logits` the pooled
        features (B, num_features) the classifier reads."""
        features = self._pool(tokens)
        return features if pre_logits else self.classifier(features)

    def reset_classifier(self, num_classes: int, *, labels: Sequence[str] | None = None) -> None:
        """A fresh classifier for `num_classes` classes, named by `labels` (default LABEL_0...);
        0 leaves none, so the model returns its pooled features."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise InvalidValueError(f"num_classes must be a non-negative number of classes, got {num_classes!r}")
        if labels is not None and len(labels) != num_classes:
            raise InvalidValueError(f"{len(labels)} labels given for {num_classes} classes")
        self._set_config(self.config.replace(num_labels=num_classes) if labels is None
                         else self.config.replace(id2label=dict(enumerate(labels))))
        weight = self.layernorm.weight
        if num_classes:
            self.classifier = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
        else:
            self.classifier = nn.Identity()
        self.classifier.apply(self._init_weights)

    def forward_intermediates(self, pixel_values: Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """`CvtModel.forward_intermediates`, with the final norm on the tokens (so the first
        result equals `forward_features`)."""
        result = self.cvt.forward_intermediates(pixel_values, indices, intermediates_only)
        if intermediates_only:
            return result
        tokens, maps = result
        return self.layernorm(tokens), maps

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss `config.loss_problem` chooses: MSE for regression, cross-entropy for integer
        class labels, BCE-with-logits for multi-hot float labels."""
        num_labels = self.config.num_labels
        problem = self.config.loss_problem(labels.dtype in (torch.long, torch.int))
        labels = labels.to(logits.device)
        if problem == "regression":
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            if labels.is_floating_point():
                raise InvalidValueError(
                    f"single-label classification needs integer class indices, got {labels.dtype} labels")
            return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1).long())
        if labels.shape != logits.shape:
            raise InvalidValueError(
                f"multi-label classification needs float multi-hot labels shaped like the logits "
                f"{tuple(logits.shape)}, got {labels.dtype} labels of shape {tuple(labels.shape)} "
                f"(integer class indices select single-label cross-entropy)")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# transformers' Auto classes build cvt's models from a cvt config (`AutoModel.from_config`,
# `AutoModelForImageClassification.from_pretrained(path, config=cvt_config)`); keyed by cvt's
# config class, so transformers' own CvT is untouched
AutoModel.register(CvtConfig, CvtModel, exist_ok=True)
AutoModelForImageClassification.register(CvtConfig, CvtForImageClassification, exist_ok=True)
