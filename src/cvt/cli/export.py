"""`cvt export`: a classifier or backbone written as ONNX, OpenVINO IR or TFLite, checked by its
runtime before it is written (the work is `cvt.engines.export`'s)."""

from __future__ import annotations

import argparse
import sys

from ..constants import EXPORT_BATCH_RANGE
from ..errors import Range
from .common import UsageError, bounded, processor_image_size


def add_parsers(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export to ONNX, OpenVINO IR or TFLite, checked before writing",
                         description="Export a classifier (input pixel_values, output logits) or a "
                         "backbone to ONNX, OpenVINO IR (.xml + .bin) or TFLite (.tflite, through "
                         'the TensorFlow twin). Needs pip install "cvt-vision[export]" '
                         '(and "cvt-vision[openvino]" for OpenVINO, "cvt-vision[tf]" for TFLite).')
    exp.add_argument("model", help="checkpoint folder, hub id (microsoft/cvt-13) or variant name")
    exp.add_argument("output", metavar="OUTPUT", help="the file to write (.onnx; .xml for openvino, "
                     "with the .bin beside it; .tflite)")
    exp.add_argument("--format", choices=("onnx", "openvino", "tflite"), default="onnx", help="default: onnx")
    exp.add_argument("--image-size", type=int, help="input height and width (default: the model's own, else 224)")
    exp.add_argument("--batch-size", type=bounded(Range(True, *EXPORT_BATCH_RANGE)),
                     help=f"fix the batch size, {EXPORT_BATCH_RANGE[0]} to {EXPORT_BATCH_RANGE[1]} (the check runs "
                     f"the model on a batch that size; default: a dynamic batch axis, which serves any)")
    exp.add_argument("--dynamic-size", action="store_true", help="symbolic height and width: one file "
                     "serves several input sizes (--image-size is then the size traced and checked)")
    exp.add_argument("--opset", type=bounded(Range(True, 1)), help="ONNX opset (default: torch's; one torch "
                     "cannot write the model at is refused, nothing written)")
    exp.add_argument("--no-check", action="store_true", help="skip the check of the written file's outputs")
    exp.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..engines import export
    from ..modeling.factory import load

    model = load(args.model)  # a classifier exports its logits; a backbone its features
    image_size = args.image_size or processor_image_size(args.model)  # a variant name: offline
    batch = "dynamic" if args.batch_size is None else str(args.batch_size)
    if args.format != "onnx" and (args.batch_size is not None or args.opset is not None or args.dynamic_size):
        raise UsageError("--batch-size, --opset and --dynamic-size apply to --format onnx only")
    pixels = f"{image_size}x{image_size} pixels"
    if args.dynamic_size:
        pixels = f"any height and width from {export.min_dynamic_size(model.config)} pixels, traced at {pixels}"
    checker = {"onnx": "onnxruntime", "openvino": "OpenVINO", "tflite": "LiteRT"}[args.format]
    check = "" if args.no_check else f" checking it with {checker}"
    print(f"exporting {args.model} ({type(model).__name__}) to {args.format} ({pixels}, batch {batch})"
          f"{',' + check if check else ''} ...", file=sys.stderr)
    try:
        if args.format == "onnx":
            result = export.export_onnx(model, args.output, image_size=image_size, batch_size=args.batch_size,
                                        opset=args.opset, check=not args.no_check, dynamic_size=args.dynamic_size)
        elif args.format == "tflite":
            result = export.export_tflite(model, args.output, image_size=image_size, check=not args.no_check)
        else:
            result = export.export_openvino(model, args.output, image_size=image_size, check=not args.no_check)
    except ImportError as err:
        raise UsageError(str(err)) from err
    except export.ExportCheckError as err:
        print(f"cvt: error: {err}", file=sys.stderr)
        return 1
    reference = "TensorFlow" if args.format == "tflite" else "PyTorch"
    checked = ("not checked" if result.max_abs_diff is None
               else f"max abs difference from {reference} {result.max_abs_diff:.2g}")
    written = str(result.path) + (f" + {result.path.with_suffix('.bin').name}" if args.format == "openvino" else "")
    opset = f", opset {result.opset}" if result.opset else ""
    size = ", dynamic height and width" if args.dynamic_size else ""
    print(f"wrote {written} ({result.bytes / 1e6:.1f} MB{opset}, batch {batch}{size}); {checked}")
    return 0
