"""cvt: the CvT image models (Wu et al. 2021) in PyTorch, weight-compatible with transformers.

`import cvt` is light: it loads neither torch nor TensorFlow. Each name below (and each
submodule, `cvt.engines`, ...) is imported on first use (PEP 562), so `from cvt import CvtModel`
loads the PyTorch models, and `cvt --help` starts at once.

The modules that moved into packages keep their old paths for one release (`_MOVED`, files in
`_moved/`): importing `cvt.weights` gives the names of `cvt.checkpoints`' modules and a
DeprecationWarning, once.
"""

import importlib
import importlib.metadata
import sys
import warnings
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
    "ImageClassificationPipeline": "inference", "pipeline": "inference", "RunSettings": "run_settings",
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

# old module path -> the modules that hold its names now (the old path goes in the next release)
_MOVED = {
    "weights": ("checkpoints.read", "checkpoints.check", "checkpoints.load", "checkpoints.write"),
    "hub": ("checkpoints.hub",), "convert": ("checkpoints.convert",),
    "processing": ("images.processing",),
    "factory": ("modeling.factory",), "attention": ("modeling.attention_maps",),
    "torch_registry": ("modeling.torch_registry",),
    "modeling_tf": ("tf",), "keras_data": ("training.keras_data",),
    "export": ("engines.export",), "onnx_graph": ("engines.onnx_graph",),
    "native": ("engines.openvino_signals",),
    "predictions": ("inference.predictions",), "serve_http": ("serve.http_limits",),
    "benchmark": ("bench",),
}


def _reexport_moved(module_name: str) -> None:
    """Fill the module of an old path (a file in `_moved/`) with its new homes' public names
    (the same objects), with a DeprecationWarning that names where they are now."""
    module = sys.modules[module_name]
    homes = [f"{__name__}.{home}" for home in _MOVED[module_name.rpartition(".")[2]]]
    warnings.warn(f"{module_name} moved to {', '.join(homes)}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=3)
    for home in homes:
        names = vars(importlib.import_module(home))
        module.__dict__.update({k: v for k, v in names.items() if not k.startswith("_")})


# the old paths' files live in _moved/, a folder on this package's own path (not a package, and
# no change to Python's import system): `import cvt.weights` finds _moved/weights.py
__path__.append(str(Path(__file__).with_name("_moved")))


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return importlib.metadata.version(DISTRIBUTION)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    here = Path(__file__).parent  # a submodule (never __main__, which runs the command line)
    if not name.startswith("_") and ((here / f"{name}.py").is_file() or (here / name).is_dir() or name in _MOVED):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cvt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {"__version__"})


__all__ = sorted(name for name, module in _EXPORTS.items() if module != "tf")
