"""Writing a checkpoint: a model saved in transformers' layout, atomically (each file written to a
private folder, then moved into place whole), so a failed save leaves the old files intact; and
the conversion of an original microsoft/CvT `.pth` file into such a folder."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import CvtConfig
from ..errors import CheckpointError, short
from ..files import new_file_mode, put_in_place, require_folder, write_json
from . import convert
from .check import M
from .hub import CONFIG_NAME
from .read import PROCESSOR_CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHT_FILES, read_state_dict

logger = logging.getLogger("cvt")

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
    (e.g. those of an original yaml spec, `cvt.checkpoints.convert.spec_fields`)."""
    state_dict = read_state_dict(checkpoint)
    if not convert.is_original_checkpoint(state_dict):
        raise CheckpointError(
            f"{checkpoint} is not an original microsoft/CvT checkpoint (no stage0.patch_embed.proj.weight)")
    model = cls.from_pretrained(None, config=config, state_dict=state_dict, **fields)
    model.save_pretrained(output_dir)
    return model.config
