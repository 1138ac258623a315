"""cvt: the CvT image models (Wu et al. 2021) in PyTorch, weight-compatible with transformers.

`import cvt` is light: it loads neither torch nor TensorFlow. Each name below (and each
submodule, `cvt.engines`, ...) is imported on first use (PEP 562), so `from cvt import CvtModel`
loads the PyTorch models, and `cvt --help` starts at once.
"""

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

from .constants import DISTRIBUTION

# public name -> the module that defines it
_EXPORTS = {
    "AttentionMaps": "modeling.attention_maps", "attention_maps": "modeling.attention_maps",
    "CvtConfig": "config",
    "CheckpointError": "errors", "CvtError": "errors", "InvalidValueError": "errors",
    "CvtFeatures": "modeling.factory", "create_model": "modeling.factory", "load": "modeling.factory",
    "ImageError": "images", "load_image": "images",
    "ImageClassificationPipeline": "inference", "pipeline": "inference",
    "BaseModelOutputWithCLSToken": "modeling", "CvtForImageClassification": "modeling",
    "CvtModel": "modeling", "CvtPreTrainedModel": "modeling", "ImageClassifierOutput": "modeling",
    "ImageClassifierOutputWithNoAttention": "modeling",
    "CvtImageProcessor": "images.processing",
    "get_variant": "variants", "imagenet_1k_labels": "variants", "list_models": "variants",
    # TensorFlow is an optional extra: without it, an ImportError saying pip install "cvt-vision[tf]"
    "TFBaseModelOutputWithCLSToken": "tf", "TFCvtForImageClassification": "tf",
    "TFCvtModel": "tf", "TFCvtPreTrainedModel": "tf",
    "TFImageClassifierOutputWithNoAttention": "tf",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return importlib.metadata.version(DISTRIBUTION)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    here = Path(__file__).parent  # a submodule (never __main__, which runs the command line)
    if not name.startswith("_") and ((here / f"{name}.py").is_file() or (here / name).is_dir()):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cvt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {"__version__"})


__all__ = sorted(name for name, module in _EXPORTS.items() if module != "tf")
