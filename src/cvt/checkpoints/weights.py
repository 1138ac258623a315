"""Checkpoint I/O: every file this library reads or writes for a model goes through here.

Reads a transformers-layout folder (config.json + model.safetensors, pytorch_model.bin, or
either sharded with an index), a hub repo, or a single original microsoft/CvT `.pth` file
(renamed by `cvt.convert`); which files a name means is `cvt.hub`'s answer.
Never unpickles code: safetensors first, `torch.load(weights_only=True)` otherwise. What is
read is checked before it is used: shard names stay inside the folder, the config is compared
with the weights' shapes before the model is allocated, and weights no trained model has
(integers for floats, NaN/inf, negative variances) are refused unless `check_weights=False`.
Writes atomically (temporary file, fsync, rename), so a failed save leaves the old files intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from . import convert
from ..config import CvtConfig
from ..errors import CheckpointError, CheckpointMismatchError, short
from ..files import new_file_mode, put_in_place, require_folder, write_json
from .hub import CONFIG_NAME, HUB_ARGUMENTS, Fetch, fetcher, locate

logger = logging.getLogger("cvt")

PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, PT_WEIGHTS_NAME, PT_INDEX_NAME)
HEAD_PREFIXES = ("layernorm.", "classifier.")


class CvtCheckpointModel(Protocol):
    """What loading and saving need of a model: the PyTorch models (`torch.nn.Module`) and the
    TensorFlow ones (`cvt.modeling_tf`, whose `state_dict` / `load_state_dict` speak PyTorch's
    keys and layouts) alike. A model may also offer `pytorch_shapes()` (key -> shape) so that
    checking a checkpoint needs no copy of its weights."""

    config: CvtConfig

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...

    def eval(self) -> Any: ...


M = TypeVar("M", bound=CvtCheckpointModel)


# ---------------------------------------------------------------------------------------- reading
# a checkpoint's JSON files (config, preprocessing, shard index): a 1000-class config is 50 kB
MAX_JSON_BYTES = 16 * 2**20


def read_json(path: str | os.PathLike) -> Any:
    """A checkpoint's JSON file, refused when it is larger than MAX_JSON_BYTES or nested past
    what Python's parser can follow, so a hostile file costs little to refuse."""
    size = os.stat(path).st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{short(path)} is {size:,} bytes; a checkpoint's JSON file holds at most "
                              f"{MAX_JSON_BYTES:,}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{short(path)} is not valid JSON: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{short(path)} is nested too deeply to be a checkpoint's JSON file") from None


def read_config(path: str | os.PathLike, **overrides: Any) -> CvtConfig:
    """A CvtConfig from a config.json (transformers') or an original yaml spec saved as JSON."""
    data = read_json(path)
    try:
        if isinstance(data, dict) and convert.is_original_spec(data):
            return CvtConfig(**{**convert.spec_fields(data), **overrides})
        return CvtConfig.from_dict(data, **overrides)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{short(path)}: {err}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of one weights file: safetensors, or a torch file loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {short(path)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(
                f"{short(path)} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unsafe-global errors alike mean "cannot use this"
        raise CheckpointError(
            f"{short(path)} could not be read as a PyTorch weights file with weights_only=True "
            f"(truncated, corrupt, or it holds Python objects rather than tensors): {err}") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Accept a bare state dict or the usual training wrappers ({'state_dict': ...}, DDP 'module.')."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{short(path)} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's shape from a safetensors file's header (`safe_open` reads no tensor); None
    when the file cannot be opened (reading the weights then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception:  # safetensors raises its own error types for damaged files
        return None


def folder_weight_shapes(fetch: Fetch) -> dict[str, tuple[int, ...]] | None:
    """The shapes of a folder's safetensors weights (one file or the shards an index names), from
    their headers; None for PyTorch files or anything unreadable."""
    single, index = fetch(SAFE_WEIGHTS_NAME), fetch(SAFE_INDEX_NAME)
    if single is not None:
        return safetensors_shapes(single) if index is None else None
    if index is None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in _shard_names(index)[1]:
        path = fetch(shard)
        found = safetensors_shapes(path) if path is not None else None
        if found is None:
            return None
        shapes.update(found)
    return shapes


def read_folder_weights(folder: Path, fetch: Fetch, use_safetensors: bool | None = None) -> dict[str, Tensor]:
    """The state dict of a transformers-layout folder; `fetch(name)` returns a local file or None.
    safetensors before PyTorch files (`use_safetensors`: True or False for one format only); a
    single file beside a shard index of the same format is ambiguous (which one is current?) and
    refused."""
    formats = [(SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME), (PT_WEIGHTS_NAME, PT_INDEX_NAME)]
    if use_safetensors is not None:
        formats = formats[:1] if use_safetensors else formats[1:]
    for single, index_name in formats:
        single_path, index_path = fetch(single), fetch(index_name)
        if single_path is not None and index_path is not None:
            raise CheckpointError(
                f"{short(folder)} holds both {single} and the shard index {index_name}: it is not clear "
                f"which weights are current; remove the stale one")
        if single_path is not None:
            return read_state_dict(single_path)
        if index_path is not None:
            return _read_shards(index_path, fetch)
    expected = [name for pair in formats for name in pair]
    raise CheckpointError(f"{short(folder)} holds no weights: expected one of {', '.join(expected)}"
                          + ("" if use_safetensors is None else f" (use_safetensors={use_safetensors})"))


def _shard_names(index_path: Path) -> tuple[dict[str, Any], list[str]]:
    """(a shard index, the shard files it names): plain file names beside it, never a path out of
    the folder."""
    index = read_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path} has no 'weight_map'; not a sharded checkpoint index")
    shards = sorted({str(v) for v in index["weight_map"].values()})
    for shard in shards:
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{index_path} names the shard {shard!r}; a shard must be a plain "
                                  f"file name in the checkpoint folder")
    return index, shards


def _read_shards(index_path: Path, fetch: Fetch) -> dict[str, Tensor]:
    """The shards an index names: plain file names beside it (never a path out of the folder),
    each key in exactly one shard."""
    index, shards = _shard_names(index_path)
    state_dict: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for shard in shards:
        shard_path = fetch(shard)
        if shard_path is None:
            raise CheckpointError(f"shard {shard} named in {index_path} is missing")
        for key, value in read_state_dict(shard_path).items():
            if key in origin:
                raise CheckpointError(f"{key} is in two shards, {origin[key]} and {shard}: the "
                                      f"checkpoint is inconsistent")
            state_dict[key], origin[key] = value, shard
    misplaced = [f"{k} (index: {index['weight_map'].get(k, 'not listed')}, found in {origin.get(k, 'no shard')})"
                 for k in sorted(origin.keys() | index["weight_map"].keys())
                 if str(index["weight_map"].get(k)) != origin.get(k)]
    if misplaced:
        raise CheckpointError(f"{index_path} does not describe its shards: "
                              f"{', '.join(misplaced[:8])}{' ...' if len(misplaced) > 8 else ''}")
    return state_dict


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
        return None, read_state_dict(Path(location.where))
    fetch = fetcher(location, hub_kwargs)
    stored = _stored_config(fetch, name_or_path)
    config, shapes = expected(stored), folder_weight_shapes(fetch)
    if config is not None and shapes is not None:
        check_depth_and_width(config, shapes, name_or_path)
    return stored, read_folder_weights(Path(location.where), fetch, use_safetensors)


def read_architecture(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any] | None = None
                      ) -> CvtConfig:
    """The config a name describes, without its weights: a variant's, a config.json file, or the
    config.json of a folder or hub repo (for training from scratch)."""
    location = locate(name_or_path)
    if location.variant is not None:
        return location.variant.config()
    if location.kind == "file":
        if Path(location.where).suffix != ".json":
            raise CheckpointError(f"{short(name_or_path)} is a weights file; its architecture comes with "
                                  f"its weights (leave out from-scratch), or give a config.json")
        return read_config(location.where)
    return _stored_config(fetcher(location, hub_kwargs), name_or_path)


def _stored_config(fetch: Fetch, name_or_path: str | os.PathLike) -> CvtConfig:
    config_path = fetch(CONFIG_NAME)
    if config_path is None:
        raise CheckpointError(f"{short(name_or_path)} has no {CONFIG_NAME}")
    return read_config(config_path)


# ---------------------------------------------------------------------------------------- loading
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
        model.preprocessing = stored_preprocessing(name_or_path, hub_kwargs)
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


def stored_preprocessing(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any] | None = None
                         ) -> dict[str, Any] | None:
    """The preprocessor_config.json contents a checkpoint comes with (a variant's are known), or
    None: kept on a loaded model so that saving it keeps its preprocessing with its weights."""
    location = locate(name_or_path)
    if location.variant is not None:
        return location.variant.preprocessor_config()
    if location.kind == "file":
        return None
    path = fetcher(location, hub_kwargs)(PROCESSOR_CONFIG_NAME)
    return read_json(path) if path is not None else None


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


# ---------------------------------------------------------------------------------------- writing
# weight files a save may leave stale: the single files, shard indexes and shards of both formats
_SHARD_NAME = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def save_staged(folder: str | os.PathLike, save: Callable[[Path], None], config: CvtConfig,
                preprocessing: Mapping[str, Any] | None = None) -> None:
    """Save a model into `folder` in transformers' layout: `save(staging)` writes its files into a
    private folder inside `folder` (with `preprocessing` as preprocessor_config.json), then each
    file is moved into place whole. A folder holding weight files the new ones would not replace
    (another format or sharding, which readers could take for the current weights) is refused
    before anything in it changes: cvt never deletes files it cannot show it wrote."""
    folder = require_folder(folder, "the save folder")
    folder.mkdir(parents=True, exist_ok=True)
    if config.hidden_act == "quick_gelu":
        logger.warning(
            "cvt: %s runs QuickGELU, as the original microsoft/CvT code trained (hidden_act="
            "'quick_gelu'); cvt loads it so, but transformers' CvT ignores hidden_act and runs "
            "exact GELU, so its logits differ (by ~3e-2 on the published weights)", folder)
    staging = Path(tempfile.mkdtemp(prefix=".cvt-save-", dir=folder))
    try:
        save(staging)
        if preprocessing is not None:
            write_json(staging / PROCESSOR_CONFIG_NAME, dict(preprocessing))
        written = sorted(p.name for p in staging.iterdir())
        stale = sorted(name for name in os.listdir(folder)
                       if name not in written and (name in WEIGHT_FILES or _SHARD_NAME.fullmatch(name)))
        if stale:
            raise CheckpointError(
                f"{short(folder)} holds weights this save would leave beside the new ones ({', '.join(stale)}); "
                f"remove them or save to another folder")
        mode = new_file_mode(staging)
        for name in written:
            put_in_place(staging / name, folder / name, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_arrays_pretrained(folder: str | os.PathLike, arrays: Mapping[str, Any], config: CvtConfig,
                           architecture: str, preprocessing: Mapping[str, Any] | None = None) -> None:
    """config.json + model.safetensors in transformers' layout for weights in the PyTorch layout,
    as numpy arrays (the TensorFlow models'), through `save_staged`: loadable by the PyTorch
    models and transformers. `architecture` is the PyTorch class name written into config.json;
    its "dtype" is that of the first floating-point weight."""
    from safetensors.torch import save_file

    tensors = {k: torch.as_tensor(v).detach().to("cpu").contiguous() for k, v in arrays.items()}
    data = config.to_dict()
    data["architectures"] = [architecture]
    data["dtype"] = next((str(v.dtype).removeprefix("torch.") for v in tensors.values()
                          if v.is_floating_point()), "float32")

    def save(staging: Path) -> None:
        save_file(tensors, staging / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
        write_json(staging / CONFIG_NAME, dict(sorted(data.items())))

    save_staged(folder, save, config, preprocessing)


def convert_original(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, cls: type[M],
                     config: CvtConfig | None = None, **fields: Any) -> CvtConfig:
    """Write an original microsoft/CvT checkpoint as a transformers-layout folder of `cls`
    (`CvtForImageClassification`).

    The architecture comes from `config`, else from the tensor shapes plus `fields`
    (e.g. those of an original yaml spec, `cvt.convert.spec_fields`)."""
    state_dict = read_state_dict(checkpoint)
    if not convert.is_original_checkpoint(state_dict):
        raise CheckpointError(
            f"{checkpoint} is not an original microsoft/CvT checkpoint (no stage0.patch_embed.proj.weight)")
    model = cls.from_pretrained(None, config=config, state_dict=state_dict, **fields)
    model.save_pretrained(output_dir)
    return model.config
