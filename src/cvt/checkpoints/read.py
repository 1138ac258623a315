"""Reading a checkpoint's files: every file this library reads for a model goes through here.

A transformers-layout folder (config.json + model.safetensors, pytorch_model.bin, or either
sharded with an index), a hub repo, or a single original microsoft/CvT `.pth` file; which files a
name means is `cvt.checkpoints.hub`'s answer. Never unpickles code: safetensors first,
`torch.load(weights_only=True)` otherwise. Shard names stay inside the folder, and JSON files
are bounded in size and depth before they are parsed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import CvtConfig
from ..errors import CheckpointError, short
from . import convert
from .hub import CONFIG_NAME, Fetch, fetcher, locate


PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, PT_WEIGHTS_NAME, PT_INDEX_NAME)
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
    return stored_config(fetcher(location, hub_kwargs), name_or_path)


def stored_config(fetch: Fetch, name_or_path: str | os.PathLike) -> CvtConfig:
    config_path = fetch(CONFIG_NAME)
    if config_path is None:
        raise CheckpointError(f"{short(name_or_path)} has no {CONFIG_NAME}")
    return read_config(config_path)


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
