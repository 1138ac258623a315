"""Checking a checkpoint before it is used: the config against the weights' stage, layer and width
counts (before the model is allocated), every key and shape against the model's, and the values
(weights no trained model has: integers for floats, NaN/inf, negative variances)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from ..config import CvtConfig
from ..errors import CheckpointError, CheckpointMismatchError, short
from . import convert

logger = logging.getLogger("cvt")

HEAD_PREFIXES = ("layernorm.", "classifier.")


class CvtCheckpointModel(Protocol):
    """What loading and saving need of a model: the PyTorch models (`torch.nn.Module`) and the
    TensorFlow ones (`cvt.tf`, whose `state_dict` / `load_state_dict` speak PyTorch's
    keys and layouts) alike. A model may also offer `pytorch_shapes()` (key -> shape) so that
    checking a checkpoint needs no copy of its weights."""

    config: CvtConfig

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...

    def eval(self) -> Any: ...


M = TypeVar("M", bound=CvtCheckpointModel)


def checked_state_dict(cls: type, state_dict: dict[str, Tensor], source: Any, *,
                       stored: CvtConfig | None, config: CvtConfig | None, overrides: dict[str, Any],
                       ignore_mismatched_sizes: bool, check_weights: bool = True
                       ) -> tuple[CvtConfig, dict[str, Tensor]]:
    """The config to build and the state dict in transformers' layout with `cls`'s key prefix,
    both checked before any model is allocated: the config against the weights' stage, layer
    and width counts, every key and shape against `cls(config)`'s (a head of another size only
    with `ignore_mismatched_sizes`), and with `check_weights` the values (`check_weight_values`).
    `overrides` are config fields; an original microsoft/CvT state dict is renamed."""
    if convert.is_original_checkpoint(state_dict):
        if config is None:
            try:
                config = convert.infer_config(state_dict, **overrides)
            except ValueError as err:
                raise CheckpointError(f"{short(source)}: {err}") from None
            overrides = {}
        try:
            state_dict = convert.original_to_transformers(state_dict)
        except ValueError as err:
            raise CheckpointError(f"{short(source)}: {err}") from None
    base = config or stored
    if base is None:
        raise CheckpointError(
            f"{short(source)} is a single weights file in transformers layout with no config.json "
            f"beside it; pass config=")
    try:
        config = base.replace(**overrides) if overrides else base
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{short(source)}: {err}") from None
    check_depth_and_width(config, {key: tuple(value.shape) for key, value in state_dict.items()}, source)
    planned = _planned_shapes(cls, config)
    if planned is not None:  # refuse a config that does not fit the weights before allocating it
        state_dict = match_prefix(state_dict, planned, source)
        new_head = check_keys(cls.__name__, planned, state_dict, source, reinit_head=ignore_mismatched_sizes)
        if new_head:
            logger.warning("%s: newly initialised (train before use): %s", short(source), ", ".join(new_head))
    if check_weights:
        check_weight_values(state_dict, source)
    return config, state_dict


# a stage's layers (their indices) and its width (the token embedding's output channels), by key
_STAGE_KEY = re.compile(r"(?:^|\.)encoder\.stages\.(\d+)\."
                        r"(?:layers\.(\d+)\.|embedding\.convolution_embeddings\.projection\.weight$)")


def check_depth_and_width(config: CvtConfig, shapes: Mapping[str, tuple[int, ...]], source: Any) -> None:
    """Refuse a config whose stage, layer or width counts are not the weights', read from their
    key names and shapes alone (a safetensors header is enough), before any module is built
    (even on the meta device, a config claiming thousands of layers takes minutes to build).
    Weights of no stage at all are no CvT checkpoint, whatever the config claims."""
    layers: dict[int, int] = {}
    widths: dict[int, int] = {}
    for key, shape in shapes.items():
        match = _STAGE_KEY.search(key)
        if match is None:
            continue
        stage = int(match[1])
        if match[2] is not None:
            layers[stage] = max(layers.get(stage, 0), int(match[2]) + 1)
        elif len(shape) > 0:
            widths[stage] = int(shape[0])
    if not widths:
        raise CheckpointError(f"{short(source)} does not look like a CvT checkpoint: none of its "
                              f"{len(shapes)} weights belongs to a CvT stage (its keys start: "
                              f"{', '.join(list(shapes)[:5])})")
    stages = max(widths) + 1
    problems = []
    if stages != config.num_stages:
        problems.append(f"{config.num_stages} stages in the config, {stages} in the weights")
    for s in range(min(stages, config.num_stages)):
        if layers.get(s, 0) != config.depth[s]:
            problems.append(f"stage {s} has depth {config.depth[s]} in the config, {layers.get(s, 0)} in the weights")
        if s in widths and widths[s] != config.embed_dim[s]:
            problems.append(f"stage {s} has embed_dim {config.embed_dim[s]} in the config, {widths[s]} in the weights")
    if problems:
        raise CheckpointError(f"{short(source)} does not match its configuration: {'; '.join(problems[:6])}"
                              f"{' ...' if len(problems) > 6 else ''}")


def _planned_shapes(cls: type, config: CvtConfig) -> dict[str, tuple[int, ...]] | None:
    """The state-dict shapes a PyTorch `cls(config)` will have, from a model on the meta device
    (no memory, however large the config claims to be); None for other frameworks."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return None
    with torch.device("meta"):
        return model_shapes(cls(config))


def check_weight_values(state_dict: Mapping[str, Any], source: Any) -> None:
    """Refuse weights no trained model has: integers stored for floating-point weights (cast
    silently they are wrong values, e.g. int8 quantised ones without their scales), NaN or
    infinite values, and negative BatchNorm variances. (Integer `num_batches_tracked` counters
    are normal.) `from_pretrained(..., check_weights=False)` skips this."""
    integer, nonfinite, negative = [], [], []
    for key, value in state_dict.items():
        value = torch.as_tensor(value)
        if not value.is_floating_point():
            if not key.endswith("num_batches_tracked"):
                integer.append(f"{key} ({str(value.dtype).removeprefix('torch.')})")
            continue
        if not bool(torch.isfinite(value).all()):
            nonfinite.append(key)
        if key.endswith("running_var") and bool((value < 0).any()):
            negative.append(key)
    problems = [f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for what, keys in (("integer values for floating-point weights", integer),
                                   ("NaN or infinite values", nonfinite),
                                   ("negative BatchNorm variances", negative)) if keys]
    if problems:
        raise CheckpointError(f"{short(source)} holds weights no trained model has ({'; '.join(problems)}); "
                              f"if that is intended, load with check_weights=False")


def model_shapes(model: CvtCheckpointModel) -> dict[str, tuple[int, ...]]:
    """The model's state-dict keys -> shapes, in PyTorch's layout and key order."""
    pytorch_shapes = getattr(model, "pytorch_shapes", None)
    if pytorch_shapes is not None:
        return dict(pytorch_shapes())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_prefix(state_dict: dict[str, Any], model_keys: Iterable[str], source: Any) -> dict[str, Any]:
    """Move backbone weights between `CvtModel` ('encoder.*') and the classifier ('cvt.encoder.*');
    `model_keys` are the state-dict keys of the model to load into."""
    wants_prefix = any(k.startswith("cvt.") for k in model_keys)
    has_prefix = any(k.startswith("cvt.") for k in state_dict)
    if wants_prefix and not has_prefix:
        return {f"cvt.{k}": v for k, v in state_dict.items()}
    if has_prefix and not wants_prefix:
        dropped = [k for k in state_dict if k.startswith(HEAD_PREFIXES)]
        if dropped:
            logger.info("%s: classification head not used by CvtModel: %s", source, ", ".join(dropped))
        return {k.removeprefix("cvt."): v for k, v in state_dict.items() if k.startswith("cvt.")}
    return state_dict


def load_state_dict_checked(model: CvtCheckpointModel, state_dict: dict[str, Any], source: Any,
                            reinit_head: bool = False,
                            shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Strict loading with one readable error listing every missing, unexpected or mis-shaped key
    (`check_keys`). `shapes` is `model_shapes(model)`, when the caller has it already."""
    expected = dict(shapes) if shapes is not None else model_shapes(model)
    new_head = check_keys(type(model).__name__, expected, state_dict, source, reinit_head)
    for key in new_head:
        state_dict.pop(key, None)
    if new_head:
        logger.warning("%s: newly initialised (train before use): %s", source, ", ".join(new_head))
        model.load_state_dict(state_dict, strict=False)
    else:
        model.load_state_dict(state_dict, strict=True)


def check_keys(model_name: str, expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any],
               source: Any, reinit_head: bool = False) -> list[str]:
    """The head keys to initialise anew, after refusing every missing, unexpected or mis-shaped key.

    A missing head (loading a backbone checkpoint into the classifier) is initialised and
    reported; with `reinit_head` a head of another size is too. Nothing else is tolerated.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    if expected and len(missing) == len(expected):
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"{short(source)} does not look like a CvT checkpoint: none of the {len(expected)} weights of "
            f"{model_name} is in it (its keys start: {sample})")
    new_head = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    if reinit_head:
        new_head += [k for k in mismatched if k.startswith(HEAD_PREFIXES)]
    missing = [k for k in missing if k not in new_head]
    mismatched = [k for k in mismatched if k not in new_head]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        if mismatched:
            details = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k])})"
                       for k in mismatched[:8]]
            hint = (" — to train a new classifier head, load with ignore_mismatched_sizes=True"
                    if all(k.startswith(HEAD_PREFIXES) for k in mismatched) else "")
            problems.append(f"{len(mismatched)} with another shape: {', '.join(details)}{hint}")
        raise CheckpointMismatchError(
            f"{short(source)} does not match this {model_name} configuration; " + "; ".join(problems))
    return new_head
