"""Original microsoft/CvT checkpoints: key renaming and architecture inference (no file I/O here).

The original code names weights `stage{i}.blocks.{j}.attn.conv_proj_q.conv.weight`, ...; the
transformers layout (ours) names the same tensor
`cvt.encoder.stages.{i}.layers.{j}.attention.attention.convolution_projection_query.convolution_projection.convolution.weight`.
Tensors are copied unchanged: every shape already matches.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..config import ConfigError, CvtConfig
from ..variants import imagenet_1k_labels
from ..errors import InvalidValueError

# (original pattern, transformers-layout replacement), tried in order on each key.
_STAGE, _LAYER = r"cvt.encoder.stages.\1", r"cvt.encoder.stages.\1.layers.\2"
_BLOCK = r"^stage(\d+)\.blocks\.(\d+)\."
_RENAME_TABLE = [
    (r"^stage(\d+)\.patch_embed\.proj\.", rf"{_STAGE}.embedding.convolution_embeddings.projection."),
    (r"^stage(\d+)\.patch_embed\.norm\.", rf"{_STAGE}.embedding.convolution_embeddings.normalization."),
    (r"^stage(\d+)\.cls_token$", rf"{_STAGE}.cls_token"),
    (rf"{_BLOCK}attn\.proj\.", rf"{_LAYER}.attention.output.dense."),
    (rf"{_BLOCK}mlp\.fc1\.", rf"{_LAYER}.intermediate.dense."),
    (rf"{_BLOCK}mlp\.fc2\.", rf"{_LAYER}.output.dense."),
    (rf"{_BLOCK}norm1\.", rf"{_LAYER}.layernorm_before."),
    (rf"{_BLOCK}norm2\.", rf"{_LAYER}.layernorm_after."),
    (r"^norm\.", "layernorm."),
    (r"^head\.", "classifier."),
]
for _short, _long in (("q", "query"), ("k", "key"), ("v", "value")):
    _projection = rf"{_LAYER}.attention.attention.convolution_projection_{_long}.convolution_projection"
    _RENAME_TABLE += [
        (rf"{_BLOCK}attn\.conv_proj_{_short}\.conv\.", rf"{_projection}.convolution."),
        (rf"{_BLOCK}attn\.conv_proj_{_short}\.bn\.", rf"{_projection}.normalization."),
        (rf"{_BLOCK}attn\.proj_{_short}\.", rf"{_LAYER}.attention.attention.projection_{_long}."),
    ]
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in _RENAME_TABLE]

# Patch-embedding stride and padding of every released CvT, by kernel size (not stored in weights).
_EMBED_STRIDE_PADDING = {7: (4, 2), 3: (2, 1)}
_HEAD_DIM = 64  # every released CvT uses 64 channels per head


def is_original_checkpoint(state_dict: dict[str, Tensor]) -> bool:
    return any(re.match(r"^stage\d+\.patch_embed\.proj\.weight$", k) for k in state_dict)


def original_to_transformers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original state dict to the transformers layout; unknown keys are an error."""
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        for pattern, replacement in _RENAMES:
            new_key, n = pattern.subn(replacement, key)
            if n:
                renamed[new_key] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise InvalidValueError(
            f"{len(unknown)} keys of this original CvT checkpoint have no transformers equivalent: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    return renamed


def infer_config(state_dict: dict[str, Tensor], **overrides: Any) -> CvtConfig:
    """Guess the architecture of an original checkpoint from its tensor shapes.

    Read from shapes: stages, widths, depths, kernel sizes, MLP ratio, q/k/v bias, cls tokens,
    'dw_bn' vs parameter-free ('avg'; 'linear' stages crash in the original code), label count.
    Not stored anywhere, so taken from the released models: patch stride/padding by kernel size
    and 64 channels per head. Pass `config=` (or these fields as overrides) for anything else.
    """
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^stage(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise InvalidValueError("not an original CvT checkpoint: no stage0.* ... stageN.* keys")
    fields: dict[str, list[Any]] = {name: [] for name in (
        "patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "depth",
        "mlp_ratio", "qkv_bias", "cls_token", "qkv_projection_method", "kernel_qkv")}
    for s in stages:
        embed = state_dict[f"stage{s}.patch_embed.proj.weight"]
        dim, kernel = embed.shape[0], embed.shape[-1]
        if s == 0:
            num_channels = embed.shape[1]
        depth = len({int(m.group(1)) for k in state_dict
                     if (m := re.match(rf"^stage{s}\.blocks\.(\d+)\.", k))})
        stride_padding = _EMBED_STRIDE_PADDING.get(kernel)
        if "num_heads" not in overrides and dim % _HEAD_DIM:
            raise InvalidValueError(
                f"cannot infer num_heads of stage {s} (width {dim} is not a multiple of 64); "
                f"pass config= or num_heads=")
        if stride_padding is None and not {"patch_stride", "patch_padding"} <= overrides.keys():
            raise InvalidValueError(
                f"cannot infer the stride and padding of stage {s}'s {kernel}x{kernel} token "
                f"embedding; pass config= or patch_stride= and patch_padding=")
        dw = state_dict.get(f"stage{s}.blocks.0.attn.conv_proj_q.conv.weight")
        fc1 = state_dict.get(f"stage{s}.blocks.0.mlp.fc1.weight")
        fields["patch_sizes"].append(kernel)
        fields["patch_stride"].append(stride_padding[0] if stride_padding else 1)
        fields["patch_padding"].append(stride_padding[1] if stride_padding else 0)
        fields["embed_dim"].append(dim)
        fields["num_heads"].append(max(dim // _HEAD_DIM, 1))
        fields["depth"].append(depth)
        fields["mlp_ratio"].append(fc1.shape[0] / dim if fc1 is not None else 4.0)
        fields["qkv_bias"].append(f"stage{s}.blocks.0.attn.proj_q.bias" in state_dict)
        fields["cls_token"].append(f"stage{s}.cls_token" in state_dict)
        fields["qkv_projection_method"].append("dw_bn" if dw is not None else "avg")
        fields["kernel_qkv"].append(dw.shape[-1] if dw is not None else 3)
    head = state_dict.get("head.weight")
    num_labels = head.shape[0] if head is not None else 0
    n = len(stages)
    inferred: dict[str, Any] = dict(
        num_channels=num_channels, hidden_act="quick_gelu",
        attention_drop_rate=[0.0] * n, drop_rate=[0.0] * n, drop_path_rate=[0.0] * (n - 1) + [0.1],
        padding_kv=[1] * n, stride_kv=[2] * n, padding_q=[1] * n, stride_q=[1] * n, **fields)
    if not {"num_labels", "id2label"} & overrides.keys():
        if num_labels == 1000:
            inferred["id2label"] = dict(enumerate(imagenet_1k_labels()))
        else:
            inferred["num_labels"] = num_labels
    return CvtConfig(**{**inferred, **overrides})


# Original yaml MODEL.SPEC keys -> CvtConfig fields.
_SPEC_KEYS = {
    "PATCH_SIZE": "patch_sizes", "PATCH_STRIDE": "patch_stride", "PATCH_PADDING": "patch_padding",
    "DIM_EMBED": "embed_dim", "NUM_HEADS": "num_heads", "DEPTH": "depth", "MLP_RATIO": "mlp_ratio",
    "ATTN_DROP_RATE": "attention_drop_rate", "DROP_RATE": "drop_rate",
    "DROP_PATH_RATE": "drop_path_rate", "QKV_BIAS": "qkv_bias", "CLS_TOKEN": "cls_token",
    "QKV_PROJ_METHOD": "qkv_projection_method", "KERNEL_QKV": "kernel_qkv",
    "PADDING_KV": "padding_kv", "STRIDE_KV": "stride_kv", "PADDING_Q": "padding_q",
    "STRIDE_Q": "stride_q",
}
_SPEC_IGNORED = {"NUM_STAGES", "POS_EMBED", "INIT"}


def is_original_spec(data: dict[str, Any]) -> bool:
    return "DIM_EMBED" in data or "SPEC" in data


def spec_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """CvtConfig fields from the original yaml's `MODEL.SPEC` (as a dict), with QuickGELU as it
    trained. The label count is not part of a spec: it comes from the checkpoint's head."""
    spec = spec.get("SPEC", spec)
    unknown = set(spec) - _SPEC_KEYS.keys() - _SPEC_IGNORED
    if unknown:
        raise ConfigError(f"unknown keys in the original CvT spec: {', '.join(sorted(unknown))}")
    return {"hidden_act": "quick_gelu", **{_SPEC_KEYS[k]: v for k, v in spec.items() if k in _SPEC_KEYS}}
