"""cvt: the CvT image models (Wu et al. 2021) in PyTorch, weight-compatible with transformers."""

import importlib.abc
import importlib.metadata
import importlib.util
import sys
from typing import Any

from .attention import AttentionMaps, attention_maps
from .config import CvtConfig
from .errors import DISTRIBUTION, CvtError, InvalidValueError
from .images import ImageError, load_image
from .inference import ImageClassificationPipeline, pipeline
from .modeling import (
    BaseModelOutputWithCLSToken,
    CvtForImageClassification,
    CvtModel,
    CvtPreTrainedModel,
    ImageClassifierOutputWithNoAttention,
    create_model,
)
from .processing import CvtImageProcessor
from .variants import get_variant, imagenet_1k_labels, list_models
from .weights import CheckpointError

try:  # the installed distribution's version, one fact (pyproject.toml) for `cvt --version` too
    __version__ = importlib.metadata.version(DISTRIBUTION)
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "unknown"

# TensorFlow is an optional extra: its models load on first access, so `import cvt` stays fast.
_TF_EXPORTS = (
    "TFBaseModelOutputWithCLSToken",
    "TFCvtForImageClassification",
    "TFCvtModel",
    "TFCvtPreTrainedModel",
    "TFImageClassifierOutputWithNoAttention",
)


def __getattr__(name: str) -> Any:
    if name in _TF_EXPORTS:
        from . import modeling_tf  # without TensorFlow: an ImportError saying pip install "cvt-vision[tf]"

        return getattr(modeling_tf, name)
    raise AttributeError(f"module 'cvt' has no attribute {name!r}")


def _register_keras_classes() -> None:
    """Register cvt's Keras classes, where TensorFlow is installed (they register on import)."""
    try:
        from . import modeling_tf  # noqa: F401
    except ImportError:
        pass


class _RegisterOnKerasImport(importlib.abc.MetaPathFinder):
    """`keras.models.load_model` finds only registered classes and never imports cvt itself, while
    `import cvt` leaves TensorFlow unloaded: so cvt's Keras classes register right after keras is
    imported, and a fresh process that imported cvt can load a saved `.keras` model."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                _register_keras_classes()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "keras" in sys.modules:
    _register_keras_classes()
elif not any(isinstance(finder, _RegisterOnKerasImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnKerasImport())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TF_EXPORTS))


__all__ = [
    "AttentionMaps",
    "BaseModelOutputWithCLSToken",
    "CheckpointError",
    "CvtConfig",
    "CvtError",
    "CvtForImageClassification",
    "CvtImageProcessor",
    "CvtModel",
    "CvtPreTrainedModel",
    "ImageClassificationPipeline",
    "ImageClassifierOutputWithNoAttention",
    "ImageError",
    "InvalidValueError",
    "attention_maps",
    "create_model",
    "get_variant",
    "imagenet_1k_labels",
    "list_models",
    "load_image",
    "pipeline",
]
