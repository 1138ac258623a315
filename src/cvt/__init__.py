"""cvt: the CvT image models (Wu et al. 2021) in PyTorch, weight-compatible with transformers."""

from typing import Any

from .attention import AttentionMaps, attention_maps
from .config import CvtConfig
from .errors import CvtError, InvalidValueError
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

__version__ = "0.1.0"

# TensorFlow is an optional extra: its models load on first access, so `import cvt` stays fast.
# Loading them (`cvt.modeling_tf`) registers them with Keras, which `keras.models.load_model` needs.
_TF_EXPORTS = (
    "TFBaseModelOutputWithCLSToken",
    "TFCvtForImageClassification",
    "TFCvtModel",
    "TFCvtPreTrainedModel",
    "TFImageClassifierOutputWithNoAttention",
)


def __getattr__(name: str) -> Any:
    if name in _TF_EXPORTS:
        from . import modeling_tf  # without TensorFlow: an ImportError saying pip install "cvt[tf]"

        return getattr(modeling_tf, name)
    raise AttributeError(f"module 'cvt' has no attribute {name!r}")


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
