"""Fine-tuning and training CvT models: data sources, recipes, the training loop, evaluation.

`cvt train`, `cvt eval` and `cvt demo` are thin wrappers around `train`, `evaluate_model` and
`run_demo`. Needs the `train` extra (torchvision, matplotlib, scikit-learn). Names load on first
use (PEP 562), so the command line reads the recipes without loading torch.
"""

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "DataError": "data", "LabelledImages": "data", "load_source": "data",
    "RECIPES": "recipes", "Recipe": "recipes", "get_recipe": "recipes",
    "EvalResult": "trainer", "TrainOptions": "trainer", "evaluate_model": "scoring",
    "load_model": "trainer", "train": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cvt.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
