"""Fine-tuning and training CvT models: data sources, recipes, the training loop, evaluation.

`cvt train`, `cvt eval` and `cvt demo` are thin wrappers around `train`, `evaluate_model` and
`run_demo`. Needs the `train` extra (torchvision, matplotlib, scikit-learn).
"""

from .data import DataError, LabelledImages, load_source
from .recipes import RECIPES, Recipe, get_recipe
from .trainer import EvalResult, TrainOptions, evaluate_model, load_model, train

__all__ = ["DataError", "EvalResult", "LabelledImages", "RECIPES", "Recipe", "TrainOptions",
           "evaluate_model", "get_recipe", "load_model", "load_source", "train"]
