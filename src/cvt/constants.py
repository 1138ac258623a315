"""Facts the library, its engines, its exporters and its command line share, each defined once
here, free of torch (so that the command line can offer them as choices without loading it)."""

from __future__ import annotations

# the name cvt is installed under (`pip install cvt-vision`); its version is cvt's
DISTRIBUTION = "cvt-vision"

# the largest absolute difference allowed between what the plain fp32 model computes and an
# fp32 engine, an exported file (ONNX, OpenVINO IR, TFLite) or the benchmark's other sides
TOLERANCE = 1e-4

# every LayerNorm's epsilon: the original code's and transformers' value (config.layer_norm_eps,
# a transformers field, is not used there either)
LAYER_NORM_EPS = 1e-5

# the inference engines (`cvt.engines.build_engine`, --engine) and the precisions they run
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
ENGINE_PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # fp16: CUDA only; int8: calibrated

# images per forward pass when `cvt eval` scores a labelled set (a pipeline's default is smaller:
# `cvt.RunSettings.batch_size`)
EVAL_BATCH_SIZE = 64

# the precisions training runs at (`cvt train --precision`): autocast, no int8
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")

# what `cvt predict` writes
PREDICT_FORMATS = ("table", "json", "jsonl", "csv", "parquet")

# every size a user can ask for, bounded before any memory is spent on it (inclusive pixels):
# an input's height and width (--image-size, image_size=, an engine's build check) and the
# picture `cvt attention --size` draws
IMAGE_SIZE_RANGE = (1, 1024)
# `cvt attention` draws in float64 arrays, about 130 bytes per output pixel: 2048 x 2048 stays
# near 0.55 GB (8192 x 8192 took 9 GB)
PICTURE_SIZE_RANGE = (1, 2048)

# a fixed batch `cvt export --batch-size` writes: its check runs the model on a batch that size
# (CvT-13 at 224 pixels: about 14 MB an image, under 1 GB at 64); a dynamic batch axis, the
# default, serves any batch
EXPORT_BATCH_RANGE = (1, 64)

# how much of a long name (a model name, a path) a message shows at each end
NAME_SHOWN = 60
