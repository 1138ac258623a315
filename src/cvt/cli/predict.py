"""`cvt predict`: the top-k labels of image files and folders (the work is `cvt.predict`'s)."""

from __future__ import annotations

import argparse

from ..constants import PREDICT_FORMATS
from ..run_settings import RunSettings
from .common import (add_engine_arguments, add_ray_arguments, messages_on_stderr, run_settings,
                     terminate_as_interrupt)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pred = sub.add_parser("predict", help="classify images: top-k labels per file",
                          description="Classify image files, and the images found (recursively) in "
                          "folders. Exit status 1: some files could not be classified; 4: the Ray cluster "
                          "was lost mid-run (the rows finished before are written).")
    pred.add_argument("model", help="variant name (cvt-13: its published weights), hub id, "
                      "checkpoint folder or weights file (.pth, .safetensors)")
    pred.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                      help="image files, and folders searched recursively for images")
    pred.add_argument("--top-k", type=int, default=RunSettings.top_k,
                      help=f"labels per image (default: {RunSettings.top_k})")
    pred.add_argument("--batch-size", type=int, default=RunSettings.batch_size,
                      help=f"images per forward pass (default: {RunSettings.batch_size})")
    pred.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda or mps if available)")
    pred.add_argument("--format", choices=PREDICT_FORMATS, default="table", help="default: table")
    pred.add_argument("--output", help="write the results to this file instead of stdout")
    pred.add_argument("--image-size", type=int, help="input size (default: the model's own "
                      "preprocessing; needed for a weights file, which carries none)")
    add_ray_arguments(pred)
    add_engine_arguments(pred)
    pred.set_defaults(run=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from .. import predict

    with messages_on_stderr(), terminate_as_interrupt():
        return predict.run(args.model, args.inputs, run_settings(args), fmt=args.format, output=args.output,
                           ray=args.ray, workers=args.workers, cpus_per_worker=args.cpus_per_worker)
