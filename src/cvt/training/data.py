"""Labelled image sources for training and evaluation, and the loaders that feed them.

A source is one of: an ImageFolder tree (`root/<class>/*.jpg`, or `root/train/<class>/...` with
`root/val/<class>/...`), a CSV or JSONL table of `path,label` (paths relative to the table), or a
Hugging Face `datasets` dataset with an image and a label column. Every source becomes a
`LabelledImages`: items, their class indices and the class names (whose order becomes the
model's id2label). Unreadable images are reported and left out before training starts; one that
fails later anyway is skipped by the loader, so a bad file never ends an epoch.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..images import IMAGE_EXTENSIONS, ImageError, as_rgb_image, check_image_file, load_image
from .augment import seeded
from ..errors import InvalidValueError, install_hint

logger = logging.getLogger("cvt")

TABLE_SUFFIXES = {".csv", ".jsonl"}
TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "validation", "valid")
HF_PREFIX = "hf:"


class DataError(InvalidValueError):
    """A dataset that cannot be used as given (missing, empty, inconsistent labels)."""


@dataclass
class LabelledImages:
    """Images (file paths, or row indices of a `datasets` dataset) with class indices."""

    items: list[Any]
    labels: list[int]
    classes: list[str]
    load: Callable[[Any], Image.Image]
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages([self.items[i] for i in indices], [self.labels[i] for i in indices],
                              self.classes, self.load, self.problems)

    def relabel(self, classes: Sequence[str], what: str) -> LabelledImages:
        """The same images indexed by another class list (e.g. the model's id2label order)."""
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(self.classes) - index.keys())
        if unknown:
            raise DataError(f"{what} has classes the model does not know: {', '.join(unknown[:10])}"
                            f"{' ...' if len(unknown) > 10 else ''} (model classes: "
                            f"{', '.join(list(classes)[:10])}{' ...' if len(classes) > 10 else ''})")
        mapping = [index[name] for name in self.classes]
        return LabelledImages(self.items, [mapping[y] for y in self.labels], list(classes), self.load,
                              self.problems)


# ---------------------------------------------------------------------------------------- sources
def load_source(data: Any, val_data: Any = None, val_split: float = 0.1, seed: int = 0
                ) -> tuple[LabelledImages, LabelledImages | None]:
    """(train, val) from what the user passed to `--data` / `--val-data`.

    A separate validation part (a `val/` folder, `--val-data`, a `validation` split) wins;
    otherwise `val_split` of each class is held out, reproducibly for a given seed.
    """
    train, val = _read(data, want_val=val_data is None)
    if len(train.classes) < 2:
        raise DataError(f"{data}: training needs at least two classes, this data has "
                        f"{len(train.classes)} ({', '.join(train.classes)}): a classifier of one "
                        f"class has nothing to learn (its loss is 0, its accuracy 1.0)")
    if val_data is not None:
        val, _ = _read(val_data, want_val=False)
    if val is None and val_split > 0:
        train, val = split(train, val_split, seed)
    if val is not None:
        val = val.relabel(train.classes, f"validation data {val_data or data}")
    return train, val


def load_eval_source(data: Any) -> LabelledImages:
    """The images `cvt eval` scores: the validation part of a training layout, else all of it."""
    train, val = _read(data, want_val=True)
    return val if val is not None else train


def _read(data: Any, want_val: bool) -> tuple[LabelledImages, LabelledImages | None]:
    if not isinstance(data, (str, Path)):
        return _read_hf(data, want_val)
    if str(data).startswith(HF_PREFIX):
        return _read_hf(str(data)[len(HF_PREFIX):], want_val)
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected an image folder, a .csv or .jsonl "
                        f"table, or hf:<dataset>)")
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: a data file must be .csv or .jsonl with path and label columns")
        return read_table(path), None
    train_dir = _child(path, TRAIN_DIRS)
    if train_dir is None:
        return read_folder(path), None
    val_dir = _child(path, VAL_DIRS) if want_val else None
    train = read_folder(train_dir)
    return train, (read_folder(val_dir) if val_dir is not None else None)


def _child(path: Path, names: Sequence[str]) -> Path | None:
    return next((path / n for n in names if (path / n).is_dir()), None)


def read_folder(root: Path) -> LabelledImages:
    """An ImageFolder tree: one subfolder per class (sorted names), images found recursively."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    problems, files_by_class = [], {}
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            problems.append(f"class folder {class_dir} has no images; class {class_dir.name!r} left out")
            continue
        files_by_class[class_dir.name] = files
    if not files_by_class:
        raise DataError(f"{root}: none of its {len(class_dirs)} class folders holds images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    classes = list(files_by_class)
    items = [f for name in classes for f in files_by_class[name]]
    labels = [i for i, name in enumerate(classes) for _ in files_by_class[name]]
    return _drop_unreadable(LabelledImages(items, labels, classes, load_image, problems))


def read_table(path: Path) -> LabelledImages:
    """A CSV (header `path,label`) or JSONL (`{"path": ..., "label": ...}` per line) table."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: the CSV header must name 'path' and 'label' columns, "
                                f"got {reader.fieldnames}")
            rows = list(reader)
        else:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON: {err}") from None
                if not isinstance(row, dict) or "path" not in row or "label" not in row:
                    raise DataError(f"{path}:{number}: each line must be an object with 'path' and 'label'")
                rows.append(row)
    if not rows:
        raise DataError(f"{path} lists no images")
    classes = sorted({str(row["label"]) for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    items = [(path.parent / str(row["path"])) for row in rows]
    labels = [index[str(row["label"])] for row in rows]
    return _drop_unreadable(LabelledImages(items, labels, classes, load_image))


def _drop_unreadable(images: LabelledImages) -> LabelledImages:
    """Leave out files that are missing or not images, naming each one. (A cheap header check:
    damage deeper in a file surfaces when it is decoded, and the loader skips it then.)"""
    keep, problems = [], list(images.problems)
    for i, path in enumerate(tqdm(images.items, desc="checking images", unit="img", leave=False,
                                  disable=not sys.stderr.isatty())):
        try:
            check_image_file(path)  # regular files within cvt's pixel budget (images.py)
            keep.append(i)
        except ImageError as err:
            problems.append(f"unreadable image {path} skipped ({str(err).removeprefix(f'{path}: ')})")
    for problem in problems:
        logger.warning("%s", problem)
    result = images.subset(keep)
    result.problems = problems
    return result


def _read_hf(data: Any, want_val: bool) -> tuple[LabelledImages, LabelledImages | None]:
    """A `datasets` Dataset/DatasetDict (or a name / saved folder) with image and label columns."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"Hugging Face datasets need the optional package: {install_hint('hf')}") from None
    if isinstance(data, str):
        saved = (Path(data) / "dataset_dict.json").is_file() or (Path(data) / "dataset_info.json").is_file()
        try:
            data = datasets.load_from_disk(data) if saved else datasets.load_dataset(data)
        except Exception as err:  # datasets raises many types (not found, offline, bad files)
            raise DataError(f"could not load the datasets dataset {data!r}: {err}") from None
    if isinstance(data, datasets.DatasetDict):
        train_name = next((s for s in ("train",) if s in data), next(iter(data)))
        val_name = next((s for s in ("validation", "val", "valid", "test") if s in data), None)
        train = _hf_split(data[train_name])
        val = _hf_split(data[val_name]) if want_val and val_name and val_name != train_name else None
        return train, val
    return _hf_split(data), None


def _hf_split(ds: Any) -> LabelledImages:
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"a datasets dataset needs an image column (image/img) and a label column "
                        f"(label/labels); it has {ds.column_names}")
    feature = ds.features[label_col]
    values = ds[label_col]
    if hasattr(feature, "names"):
        classes, labels = list(feature.names), [int(v) for v in values]
    else:
        classes = sorted({str(v) for v in values})
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[str(v)] for v in values]
    return LabelledImages(list(range(len(ds))), labels, classes, _ImageColumn(ds, image_col))


class _ImageColumn:
    """Row -> RGB image of a `datasets` dataset (a class, not a closure: DataLoader workers
    started with 'spawn', the default on macOS and Windows, need to pickle it)."""

    def __init__(self, ds: Any, column: str) -> None:
        self.images, self.column = ds.select_columns([column]), column

    def __call__(self, row: int) -> Image.Image:
        return as_rgb_image(self.images[row][self.column])


def split(images: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Hold out `fraction` of every class (at least one image of classes with two or more)."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be a fraction between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    train_idx, val_idx = [], []
    for label in range(len(images.classes)):
        members = [i for i, y in enumerate(images.labels) if y == label]
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        val_idx += members[:n_val]
        train_idx += members[n_val:]
    return images.subset(sorted(train_idx)), images.subset(sorted(val_idx))


# ---------------------------------------------------------------------------------------- loading
class TransformedImages(Dataset):
    """Decoded, transformed images. Random transforms are seeded per (seed, epoch, index), so the
    augmentation of an image does not depend on worker count, process count or resumption."""

    def __init__(self, images: LabelledImages, transform: Callable[[Image.Image], torch.Tensor],
                 seed: int = 0) -> None:
        self.images, self.transform, self.seed = images, transform, seed
        self.epoch = 0  # set before each epoch's iterator is created (workers get a copy)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        item = self.images.items[index]
        try:
            image = self.images.load(item)
            with seeded(hash((self.seed, self.epoch, index)) % 2**63):
                pixels = self.transform(image)  # preprocessing refuses what is over the budget
        except (ImageError, OSError) as err:  # damaged deeper than the header check saw: skip it
            logger.warning("unreadable image %s skipped (%s)", item, err)
            return None
        return pixels, self.images.labels[index]


def collate(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (to resume at a saved step)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # index into this rank's share of the epoch

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(torch.utils.data.Sampler):
    """Every `num_replicas`-th index from `rank`, no padding: sums over ranks count each image once."""

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, batch_size: int, sampler: torch.utils.data.Sampler, workers: int,
                drop_last: bool) -> DataLoader:
    """A DataLoader with its own generator: starting an epoch (or a resumed one) draws nothing
    from the global generator, which stochastic depth and dropout use."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())
