"""cvt: the CvT image models (Wu et al. 2021) in PyTorch, weight-compatible with transformers."""

from .config import CvtConfig
from .images import ImageError, load_image
from .inference import ImageClassificationPipeline, pipeline
from .modeling import (
    BaseModelOutputWithCLSToken,
    CvtForImageClassification,
    CvtModel,
    CvtPreTrainedModel,
    ImageClassifierOutputWithNoAttention,
)
from .processing import CvtImageProcessor
from .variants import create_model, get_variant, imagenet_1k_labels, list_models
from .weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "BaseModelOutputWithCLSToken",
    "CheckpointError",
    "CvtConfig",
    "CvtForImageClassification",
    "CvtImageProcessor",
    "CvtModel",
    "CvtPreTrainedModel",
    "ImageClassificationPipeline",
    "ImageClassifierOutputWithNoAttention",
    "ImageError",
    "create_model",
    "get_variant",
    "imagenet_1k_labels",
    "list_models",
    "load_image",
    "pipeline",
]
