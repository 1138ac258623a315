"""`tf.data` input for Keras: the image folders `cvt train` reads, preprocessed as the checkpoint's
`CvtImageProcessor` does, so a TensorFlow model sees exactly the pixels its PyTorch twin sees.

    train, classes = image_dataset("photos/train", processor, batch_size=32, shuffle=True)
    model.fit(train, validation_data=image_dataset("photos/val", processor, classes=classes)[0])

Needs the `tf` extra. TensorFlow comes through `cvt.tf`, the one place cvt loads it
(and its side effects, documented there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..tf import tf
from ..images.processing import CvtImageProcessor
from .data import DataError, read_folder


def image_dataset(folder: str | os.PathLike, processor: CvtImageProcessor, *, batch_size: int = 32,
                  shuffle: bool = False, seed: int = 0, classes: Sequence[str] | None = None,
                  data_format: str = "channels_first", as_dict: bool = True) -> tuple[Any, list[str]]:
    """A `tf.data.Dataset` of the images under `folder/<class>/...` and its class names.

    Each element is {"pixel_values": (B, 3, H, W) float32, "labels": (B,) int64}, the layout
    transformers' TF models trained on with their own loss; with `as_dict=False` it is an
    `(pixel_values, labels)` pair for a Keras loss. `classes` (e.g. the training set's, or
    `model.config.id2label`'s order) fixes the label indices; by default they are the sorted
    folder names, as in `cvt train`. `data_format="channels_last"` gives (B, H, W, 3).
    Files are decoded and preprocessed by `processor` (Pillow, the same code as PyTorch) in
    tf.data's parallel map; `shuffle` reshuffles every epoch, from `seed`."""
    images = read_folder(Path(folder))
    if classes is not None:
        images = images.relabel(list(classes), str(folder))
    if data_format not in ("channels_first", "channels_last"):
        raise DataError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    shape = (3, processor.size, processor.size)
    if data_format == "channels_last":
        shape = (processor.size, processor.size, 3)

    def pixels(path: bytes) -> np.ndarray:
        array = processor(os.fsdecode(path), return_tensors="np")["pixel_values"][0]
        return array.transpose(1, 2, 0) if data_format == "channels_last" else array

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        values = tf.numpy_function(pixels, [path], tf.float32, stateful=False)
        return tf.ensure_shape(values, shape), label

    paths = [os.fspath(p) for p in images.items]
    data = tf.data.Dataset.from_tensor_slices((paths, np.asarray(images.labels, np.int64)))
    if shuffle:
        data = data.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if as_dict:
        data = data.map(lambda x, y: {"pixel_values": x, "labels": y})
    return data.prefetch(tf.data.AUTOTUNE), list(images.classes)
