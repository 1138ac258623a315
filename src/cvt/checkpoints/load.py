"""Loading a model from a checkpoint: read each file once (`read`), check it (`check`), then build
the caller's model class with it; the PyTorch and TensorFlow models' `from_pretrained` and
`cvt.load` all come through `load_pretrained`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import CvtConfig
from . import convert, read
from .check import (M, check_depth_and_width, checked_state_dict, load_state_dict_checked, match_prefix,
                    model_shapes)
from .hub import HUB_ARGUMENTS, fetcher, locate


def resolve(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any] | None = None,
            expected: Callable[[CvtConfig], CvtConfig | None] = lambda stored: None,
            use_safetensors: bool | None = None) -> tuple[CvtConfig | None, dict[str, Tensor]]:
    """Find a checkpoint: (its config.json, or None for a single weights file; its state dict,
    in whatever layout the file holds). For a folder of safetensors weights, the config that
    `expected(stored)` gives is first checked against the headers' shapes, so a config far
    deeper than its weights is refused before they are read. `use_safetensors` is
    transformers': True reads only safetensors, False only PyTorch files, None either."""
    location = locate(name_or_path)
    if location.kind == "file":
        return None, read.read_state_dict(Path(location.where))
    fetch = fetcher(location, hub_kwargs)
    stored = read.stored_config(fetch, name_or_path)
    config, shapes = expected(stored), read.folder_weight_shapes(fetch)
    if config is not None and shapes is not None:
        check_depth_and_width(config, shapes, name_or_path)
    return stored, read.read_folder_weights(Path(location.where), fetch, use_safetensors)


# `from_pretrained` arguments that are config fields too, but mean the loading's (the weights' dtype)
_LOADING_NOT_CONFIG = {"dtype", "torch_dtype"}
# config properties (not fields) that `from_pretrained` sets, as transformers' loading does
_CONFIG_PROPERTIES = {"num_labels", "output_attentions"}
Build = Callable[..., Any]  # (cls, config, state_dict, source, ignore_mismatched_sizes, **kwargs) -> model


def load_pretrained(cls: type[M], name_or_path: str | os.PathLike | None, *, config: CvtConfig | None = None,
                    ignore_mismatched_sizes: bool = False, check_weights: bool = True,
                    backbone: type[M] | None = None, build: Build | None = None,
                    state_dict: dict[str, Tensor] | None = None, **kwargs: Any) -> Any:
    """Build `cls` from a checkpoint, reading each file once and checking it before `build`
    makes the model (default `build_and_load`; the PyTorch models hand the checked state dict to
    transformers' loading, which takes the remaining `kwargs`); see
    `CvtPreTrainedModel.from_pretrained`. With `backbone`, a checkpoint without a classifier
    builds `backbone` instead (`cvt.load`). `name_or_path=None` loads `state_dict` (with `config`,
    unless it is an original microsoft/CvT state dict)."""
    if torch.get_default_device().type == "meta":  # transformers' words, which its users know
        raise RuntimeError("You are using `from_pretrained` with a meta device context manager: weights "
                           "cannot be loaded there; load outside it (build a model without weights "
                           "on the meta device with the class itself)")
    config = CvtConfig.of(config) if config is not None else None
    hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_ARGUMENTS}
    use_safetensors = kwargs.pop("use_safetensors", None)
    fields = {f.name for f in dataclasses.fields(CvtConfig)} | _CONFIG_PROPERTIES
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields - _LOADING_NOT_CONFIG}
    if build is None and kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments: {', '.join(sorted(kwargs))}")
    if name_or_path is None:
        if state_dict is None or (config is None and not convert.is_original_checkpoint(state_dict)):
            raise TypeError("from_pretrained(None, ...) loads a state dict: give config= and state_dict= "
                            "(an original microsoft/CvT state dict needs no config)")
        stored, source = None, "the given state dict"
    elif state_dict is not None:
        raise TypeError("give a checkpoint name or state_dict=, not both (as transformers)")
    else:
        stored, state_dict = resolve(name_or_path, hub_kwargs,
                                     lambda stored: _configured(config or stored, overrides), use_safetensors)
        source = name_or_path
    if backbone is not None and not has_head(state_dict):
        cls = backbone
    config, state_dict = checked_state_dict(cls, state_dict, source, stored=stored, config=config,
                                            overrides=overrides, check_weights=check_weights,
                                            ignore_mismatched_sizes=ignore_mismatched_sizes)
    result = (build or build_and_load)(cls, config, state_dict, source,
                                       ignore_mismatched_sizes=ignore_mismatched_sizes, **kwargs)
    model = result[0] if isinstance(result, tuple) else result  # (model, loading info)
    if name_or_path is not None:
        model.preprocessing = read.stored_preprocessing(name_or_path, hub_kwargs)
        model.config.name_or_path = str(name_or_path)
    return result


def build_and_load(cls: type[M], config: CvtConfig, state_dict: dict[str, Any], source: Any, *,
                   ignore_mismatched_sizes: bool) -> M:
    """`cls(config)` holding `state_dict`, in eval mode: the TensorFlow models, whose keys and
    shapes are checked here, against the built model (`load_state_dict_checked`)."""
    model = cls(config)  # type: ignore[call-arg]  (every CvT model class takes its config)
    shapes = model_shapes(model)
    load_state_dict_checked(model, match_prefix(state_dict, shapes, source), source,
                            reinit_head=ignore_mismatched_sizes, shapes=shapes)
    return model.eval()


def _configured(base: CvtConfig, overrides: dict[str, Any]) -> CvtConfig | None:
    """The config a load will build, if the overrides apply (else the load says why, later)."""
    try:
        return base.replace(**overrides) if overrides else base
    except (ValueError, TypeError):
        return None


def has_head(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict (transformers' layout or the original's) holds a classifier: judged
    by the classifier's own weights, never by the final norm beside it."""
    return any(key.split(".")[0] in ("classifier", "head") for key in state_dict)
