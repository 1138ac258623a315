"""`cvt demo`: the whole fine-tuning workflow, offline, on real handwritten digits.

scikit-learn ships 1,797 labelled 8x8 scans of handwritten digits (UCI). The demo writes them as
an image folder (upscaled to 24x24 PNGs), trains a compact CvT on it with `cvt train`'s own code,
scores the best checkpoint as `cvt eval` does, and classifies held-out files through the
`cvt predict` pipeline. No pretrained weights are needed (the hub may be out of reach), so the
model starts from random weights; everything else is what a fine-tuning user runs.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from PIL import Image

from ..config import CvtConfig
from ..inference import pipeline
from ..run_settings import RunSettings
from ..modeling import CvtForImageClassification
from ..errors import InvalidValueError, short
from ..files import require_folder
from .folder import MODEL_FOLDERS, RECORD_NAME, RUN_FILES
from .recipes import Recipe
from .report import format_table, plot_confusion
from .scoring import evaluate_model
from .trainer import TrainOptions, train

logger = logging.getLogger("cvt")

IMAGE_SIZE = 24
VAL_FRACTION = 0.2
HELD_OUT_SHOWN = 8
CONFUSION_NAME = "confusion_matrix.png"
# everything the demo writes in its --output-dir (the run's files, the data, the plots)
OUTPUTS = ("data", *MODEL_FOLDERS, *RUN_FILES, RECORD_NAME, CONFUSION_NAME)

# About 0.54 M parameters; stride-2 token embeddings keep 12x12, 6x6 and 3x3 grids at 24 pixels.
DEMO_CONFIG = CvtConfig(
    embed_dim=(32, 64, 96), num_heads=(1, 2, 3), depth=(1, 2, 3),
    patch_sizes=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
    drop_path_rate=(0.0, 0.0, 0.0))

# Digits are not mirror-symmetric, and an 8x8 scan has no detail to spare: no flips, mild crops.
DEMO_RECIPE = Recipe(
    epochs=6, batch_size=64, lr=2e-3, lr_batch=64, weight_decay=0.05, warmup_epochs=0.5,
    warmup_lr=1e-5, min_lr=1e-5, label_smoothing=0.1, crop_scale=(0.7, 1.0), hflip=0.0,
    randaugment=False, random_erasing=0.0, mixup=0.0, cutmix=0.0, clip_grad=1.0, ema_decay=None)


def write_digits(root: Path, seed: int = 0) -> list[tuple[Path, str]]:
    """scikit-learn's digits as root/train/<digit>/*.png and root/val/<digit>/*.png (a fifth of
    each digit, chosen by `seed`); returns the validation files with their true digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    held_out: list[tuple[Path, str]] = []
    seen: dict[int, int] = {}
    per_digit = {d: int((digits.target == d).sum()) for d in range(10)}
    for i in order:
        digit = int(digits.target[i])
        seen[digit] = seen.get(digit, 0) + 1
        part = "val" if seen[digit] <= round(VAL_FRACTION * per_digit[digit]) else "train"
        scan = Image.fromarray((digits.images[i] * (255 / 16)).round().astype("uint8"), mode="L")
        path = root / part / str(digit) / f"digit-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scan.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).save(path)
        if part == "val":
            held_out.append((path, str(digit)))
    return sorted(held_out)


def run_demo(output_dir: Path, epochs: int | None = None, workers: int = 2) -> float:
    """Train, evaluate, classify; print what happened; returns the validation top-1 accuracy."""
    output_dir = Path(output_dir)
    _check_outputs(output_dir)
    started = time.perf_counter()
    data = output_dir / "data"
    held_out = write_digits(data)
    print(f"wrote scikit-learn's handwritten digits to {data} "
          f"({sum(1 for _ in (data / 'train').rglob('*.png'))} training, {len(held_out)} held-out images, "
          f"{IMAGE_SIZE}x{IMAGE_SIZE})")
    print(f"training a compact CvT ({_parameters(DEMO_CONFIG):,} parameters) from random weights "
          f"for {epochs or DEMO_RECIPE.epochs} epochs")
    train(TrainOptions(model=DEMO_CONFIG, data=data, output_dir=output_dir, recipe=DEMO_RECIPE,
                       epochs=epochs, image_size=IMAGE_SIZE, workers=workers))

    best = output_dir / "best"
    result = evaluate_model(str(best), data / "val", RunSettings(batch_size=128), workers=workers)
    plot_confusion(result.confusion, result.classes, output_dir / CONFUSION_NAME)
    print(f"\nevaluation of {best} on the held-out digits:")
    print(format_table(result))

    print(f"\nclassifying {HELD_OUT_SHOWN} held-out files as `cvt predict {best} FILE` does:")
    classifier = pipeline("image-classification", best, top_k=1)
    shown = random.Random(1).sample(held_out, HELD_OUT_SHOWN)
    truth = dict(shown)
    for path, predictions in classifier.classify_files([p for p, _ in shown]):
        best_guess = predictions[0]
        mark = "right" if best_guess["label"] == truth[path] else "WRONG"
        print(f"  {path}  true {truth[path]}  predicted {best_guess['label']} "
              f"({best_guess['score']:.2f})  {mark}")
    print(f"\noutputs in {output_dir}: best/ last/ metrics.jsonl curves.png {CONFUSION_NAME} "
          f"training_state.pt data/")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return result.top1


def _check_outputs(output_dir: Path) -> None:
    """Before anything is written: every folder and file the demo writes must be free (an existing
    data/ would get 1,797 images mixed into it, and trained on)."""
    require_folder(output_dir, "--output-dir")
    taken = [name for name in OUTPUTS if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    if taken:
        raise InvalidValueError(f"{short(output_dir)} already holds {', '.join(taken)}, which the demo "
                                f"writes; remove them or pass another --output-dir")


def _parameters(config: CvtConfig) -> int:
    return CvtForImageClassification(config.replace(num_labels=10)).num_parameters()
