"""Making models by name: `load` (whatever model a checkpoint holds), `create_model` (a named
variant, with timm's arguments) and `CvtFeatures`, the feature backbone timm's
`features_only=True` gives, described by `FeatureInfo`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..checkpoints.load import load_pretrained
from ..config import CvtConfig
from ..errors import CheckpointError
from . import CvtForImageClassification, CvtModel, build_with_transformers, select_stages
from ..variants import get_variant


def load(source: str | os.PathLike, *, config: CvtConfig | None = None, check_weights: bool = True,
         **kwargs: Any) -> CvtForImageClassification | CvtModel:
    """The model a checkpoint holds, in eval mode: a `CvtForImageClassification` when it has a
    classification head, else the backbone `CvtModel` (never a classifier with a random head).

    `source` is anything `from_pretrained` reads: a folder in transformers' layout (saved by cvt
    or by transformers, either class), a hub id, a variant name ("cvt-13": its published
    weights), or one weights file (an original microsoft/CvT `.pth`, or a transformers-layout
    file with `config=`). Each file is read once. Keyword arguments are `from_pretrained`'s:
    config fields override the stored config, hub arguments (`revision`, `cache_dir`, `token`,
    `local_files_only`) go to the hub, and `check_weights=False` loads weights no trained model
    has. The model keeps its checkpoint's preprocessing (`model.preprocessing`)."""
    return load_pretrained(CvtForImageClassification, source, config=config,
                                   check_weights=check_weights, backbone=CvtModel,
                                   build=build_with_transformers, **kwargs)


class FeatureInfo(list):
    """timm's `feature_info`: one dict per returned map (`num_chs`, `reduction`, `module`,
    `index`), with `channels()`, `reduction()` and `module_name()` listing one key for all."""

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> list[int]:
        return [info["reduction"] for info in self]

    def module_name(self) -> list[str]:
        return [info["module"] for info in self]


class CvtFeatures(nn.Module):
    """A backbone for detection and segmentation (`create_model(..., features_only=True)`):
    `forward(x)` returns the feature maps (B, C_s, H_s, W_s) of the stages in `out_indices`,
    described by `feature_info`. It holds the backbone without the final norm and classifier;
    its state-dict keys are the classifier's `cvt.*` keys."""

    def __init__(self, backbone: CvtModel, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.cvt = backbone
        config = backbone.config
        self.out_indices = tuple(select_stages(out_indices, config.num_stages))
        reductions = config.stage_reductions()
        self.feature_info = FeatureInfo(
            dict(num_chs=config.embed_dim[s], reduction=reductions[s],
                 module=f"cvt.encoder.stages.{s}", index=s) for s in self.out_indices)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """The feature maps (B, C_s, H_s, W_s) of the stages in `out_indices`, in stage order."""
        return self.cvt.forward_intermediates(pixel_values, self.out_indices, intermediates_only=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """As `CvtModel.set_grad_checkpointing`: less training memory, the same outputs."""
        self.cvt.set_grad_checkpointing(enable)


def create_model(name: str, pretrained: bool = False, *, num_classes: int | None = None,
                 in_chans: int | None = None, features_only: bool = False,
                 out_indices: int | Sequence[int] | None = None, checkpoint_path: str | None = None,
                 **config_overrides: Any) -> CvtForImageClassification | CvtFeatures:
    """Build a named variant (`cvt.list_models()`), with timm's arguments: random weights (timm's
    `pretrained=False` default), the published `microsoft/<name>` weights from the hub with
    `pretrained=True`, or a local checkpoint of this variant with `checkpoint_path=`.

    `num_classes` gives a fresh head (0: none, the model returns pooled features); `in_chans`
    sets the image channels (loaded weights are adapted by `adapt_input_channels`);
    `features_only` returns a `CvtFeatures` backbone giving the maps of the stages in
    `out_indices` (default all). Other keywords are config fields."""
    variant = get_variant(name)
    if pretrained or checkpoint_path is not None:
        model = CvtForImageClassification.from_pretrained(checkpoint_path or variant.hub_id, **config_overrides)
        _check_architecture(model.config, variant.config(**config_overrides), name,
                            checkpoint_path or variant.hub_id)
        if in_chans is not None:
            model.adapt_input_channels(in_chans)
    else:
        if in_chans is not None:
            config_overrides = {**config_overrides, "num_channels": in_chans}
        model = CvtForImageClassification(variant.config(**config_overrides))
        model.preprocessing = variant.preprocessor_config()  # saved with it: predict can run the folder
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return CvtFeatures(model.cvt, out_indices) if features_only else model


def _check_architecture(loaded: CvtConfig, expected: CvtConfig, name: str, source: str) -> None:
    """A checkpoint given for a variant must hold that variant's architecture (training-only
    rates aside)."""
    rates = {"attention_drop_rate", "drop_rate", "drop_path_rate"}
    fields = [f for f in ("num_channels",) + CvtConfig.stage_fields() if f not in rates]
    differ = [f for f in fields if getattr(loaded, f) != getattr(expected, f)]
    if differ:
        raise CheckpointError(
            f"{source}: its architecture is not {name}'s ({', '.join(differ)} differ: "
            f"{', '.join(f'{f}={getattr(loaded, f)}' for f in differ)}); create the variant it holds")
