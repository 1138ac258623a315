"""Train a compact CvT from scratch on Fashion-MNIST with `cvt train`, and score it with `cvt eval`.

Reads Debian's Fashion-MNIST (package fashion-mnist: /usr/share/datasets/fashion-mnist, gzipped
IDX files). The 10 epochs took 40 minutes on one CPU thread of a 2-core machine that other jobs
shared (2 to 4 minutes an epoch, by load) and reached a test top-1 of 0.896:

    python benchmarks/fashion_mnist.py prepare OUT_DIR
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/fashion_mnist.py train OUT_DIR RUN_DIR

`prepare` writes OUT_DIR/train/<class>/NNNNN.png (60,000), OUT_DIR/test/<class>/NNNNN.png
(10,000) and OUT_DIR/calibration/NNNNN.png (300 training images, for int8 calibration); it
skips a split that is already complete. `train` trains on OUT_DIR/train, validates each epoch
on the 10,000 test images, keeps the best epoch in RUN_DIR/best, and prints
`cvt eval --model RUN_DIR/best --data OUT_DIR/test` (fp32 top-1 on the test images).

    python benchmarks/fashion_mnist.py precision OUT_DIR RUN_DIR

scores RUN_DIR/best on the 10,000 test images with `cvt eval` at fp32 and at each reduced
precision this CPU has (bf16 with OpenVINO and the torch engine where the CPU has bf16 units;
int8 with OpenVINO and onnxruntime, calibrated on OUT_DIR/calibration), and prints each one's
top-1 and its loss against fp32. `train --epochs 3` (about 12 minutes on one thread of a Zen 5)
reaches 86.0 %, enough to judge reduced precision.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cvt.config import CvtConfig
from cvt.engines.base import cpu_has_bf16
from cvt.training.recipes import Recipe
from cvt.training.trainer import TrainOptions, train

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
CALIBRATION_IMAGES = 300
IMAGE_SIZE = 28

# About 0.35 M parameters; at 28 pixels, stride-2 token embeddings keep 14x14, 7x7 and 4x4
# grids (CvT-13's stride-4 stem would leave 7x7 at the first stage).
CONFIG = CvtConfig(
    embed_dim=(24, 48, 96), num_heads=(1, 2, 3), depth=(1, 2, 2),
    patch_sizes=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
    drop_path_rate=(0.0, 0.0, 0.0))

# Clothing is left-right symmetric (flips are fine); mild crops keep the small images whole.
RECIPE = Recipe(
    epochs=10, batch_size=128, lr=2e-3, lr_batch=128, weight_decay=0.05, warmup_epochs=0.5,
    warmup_lr=1e-5, min_lr=1e-5, label_smoothing=0.1, crop_scale=(0.7, 1.0), hflip=0.5,
    randaugment=False, random_erasing=0.0, mixup=0.0, cutmix=0.0, clip_grad=1.0, ema_decay=None)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian uint8 data, as MNIST ships) as an array of its stated shape."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=dims, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_pngs(images: np.ndarray, names: list[str], folder: Path) -> None:
    """Each image as folder/<its name>; skipped if the folder already holds as many PNGs."""
    if len(list(folder.rglob("*.png"))) == len(names):
        print(f"{folder}: already complete")
        return
    for pixels, name in zip(images, names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name)
    print(f"{folder}: wrote {len(names)} images")


def prepare(out_dir: Path) -> None:
    for split, prefix in (("test", "t10k"), ("train", "train")):
        images = read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz")
        write_pngs(images, [f"{CLASSES[y]}/{i:05d}.png" for i, y in enumerate(labels)], out_dir / split)
    # the first training images, for int8 calibration
    write_pngs(images, [f"{i:05d}.png" for i in range(CALIBRATION_IMAGES)], out_dir / "calibration")


def train_and_eval(out_dir: Path, run_dir: Path, epochs: int | None, workers: int) -> None:
    train(TrainOptions(model=CONFIG, data=out_dir / "train", val_data=out_dir / "test",
                       output_dir=run_dir, recipe=RECIPE, epochs=epochs, image_size=IMAGE_SIZE,
                       workers=workers))
    subprocess.run([sys.executable, "-m", "cvt", "eval", "--model", str(run_dir / "best"),
                    "--data", str(out_dir / "test"), "--workers", str(workers)], check=True)


def evaluate(run_dir: Path, test: Path, *options: str) -> float:
    """Top-1 of `cvt eval` on the test images with these options."""
    done = subprocess.run([sys.executable, "-m", "cvt", "eval", "--model", str(run_dir / "best"),
                           "--data", str(test), "--format", "json", *options],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout)["top1"]


def precision(out_dir: Path, run_dir: Path) -> None:
    calibration = ["--calibration", str(out_dir / "calibration")]
    runs = {"fp32 (torch)": ["--engine", "torch"], "fp32 (openvino)": ["--engine", "openvino"]}
    if cpu_has_bf16():
        for engine in ("openvino", "torch"):
            runs[f"bf16 ({engine})"] = ["--engine", engine, "--precision", "bf16", *calibration]
    else:
        print("this CPU has no bf16 units (avx512_bf16 or amx_bf16): no bf16 rows", flush=True)
    for engine in ("openvino", "onnxruntime"):
        runs[f"int8 ({engine})"] = ["--engine", engine, "--precision", "int8", *calibration]
    fp32 = None
    for name, options in runs.items():
        top1 = evaluate(run_dir, out_dir / "test", *options)
        fp32 = top1 if fp32 is None else fp32
        print(f"{name:<20} top-1 {100 * top1:.2f} %   vs fp32 {100 * (top1 - fp32):+.2f} points", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("out_dir", type=Path)
    tr = sub.add_parser("train")
    tr.add_argument("out_dir", type=Path)
    tr.add_argument("run_dir", type=Path)
    tr.add_argument("--epochs", type=int, help=f"default {RECIPE.epochs}")
    tr.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    pr = sub.add_parser("precision")
    pr.add_argument("out_dir", type=Path)
    pr.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("cvt").setLevel(logging.INFO)  # cvt train's progress: one line per epoch
    if args.command == "prepare":
        prepare(args.out_dir)
    elif args.command == "precision":
        precision(args.out_dir, args.run_dir)
    else:
        train_and_eval(args.out_dir, args.run_dir, args.epochs, args.workers)


if __name__ == "__main__":
    main()
