"""The `cvt` command line: `cvt info`, `cvt convert`, `cvt predict`, `cvt export`, `cvt attention`.

Each subcommand is a small function from parsed arguments to an exit status. The error policy:
an expected error (one of cvt's error classes, all derived from `cvt.errors.CvtError`, or a
file-system error) is one line (`cvt: error: ...`), exit status 2; exit status 1 means some inputs
failed (the others were done); anything else is a bug: its traceback, exit status 3. Ctrl-C is
exit status 130. `cvt --debug ...` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from . import attention, benchmark, convert, export, predict, weights
from .config import CvtConfig, kv_grid, stage_grids
from .files import write_atomic
from .modeling import CvtForImageClassification, CvtModel
from .processing import CvtImageProcessor
from .training.commands import add_engine_arguments, messages_on_stderr
from .training.commands import add_parsers as add_training_parsers
from .variants import VARIANTS, get_variant
from .errors import DISTRIBUTION, CvtError


class UsageError(CvtError):
    """A mistake in what the user asked for; printed without a traceback."""


# errors that say what the user (or their files, disk or network) must fix: one line, exit 2
EXPECTED_ERRORS = (CvtError, OSError)
EXIT_INPUTS_FAILED, EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 3, 130


def _describe(config: CvtConfig, image_size: int) -> str:
    with torch.device("meta"):  # shapes only: even CvT-W24 costs no memory
        params = CvtForImageClassification(config).num_parameters()
    macs = config.macs_per_image(image_size, image_size)
    lines = [f"{'stage':<6}{'width':>6}{'heads':>6}{'depth':>6}  {'projection':<11}{'cls':<5}"
             f"{'tokens':>9}{'kv tokens':>11}"]
    for s, (h, w) in enumerate(stage_grids(config, image_size, image_size)):
        kh, kw = kv_grid(config, s, h, w)
        lines.append(
            f"{s:<6}{config.embed_dim[s]:>6}{config.num_heads[s]:>6}{config.depth[s]:>6}  "
            f"{config.qkv_projection_method[s]:<11}{'yes' if config.cls_token[s] else 'no':<5}"
            f"{f'{h}x{w}':>9}{f'{kh}x{kw}':>11}")
    lines += [
        f"activation: {config.hidden_act}   labels: {config.num_labels}",
        f"parameters: {params:,}",
        f"multiply-adds per image at {image_size}x{image_size}: {macs / 1e9:.2f} G ({macs:,})",
    ]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    location = weights.locate(args.model)
    if location.variant is not None:
        variant = location.variant
        config, image_size = variant.config(), args.image_size or variant.image_size
        title = f"{variant.name} ({variant.pretraining} pre-training, ImageNet-1k top-1 {variant.top1} %)"
    elif location.kind == "file":
        if Path(location.where).suffix != ".json":
            raise UsageError(f"{args.model} is a weights file; cvt info reads a config.json, a "
                             f"checkpoint folder, a variant or a hub id")
        config, title = weights.read_config(location.where), args.model
        image_size = args.image_size or _processor_image_size(str(Path(location.where).parent))
    else:
        config, title = weights.read_architecture(args.model), args.model
        image_size = args.image_size or _processor_image_size(args.model)
    print(title)
    print(_describe(config, image_size))
    return 0


def _processor_image_size(source: str) -> int:
    """The input size a checkpoint's image processor gives (224 when it has none)."""
    try:
        return CvtImageProcessor.from_pretrained(source).size
    except weights.CheckpointError:
        return 224


def cmd_convert(args: argparse.Namespace) -> int:
    if args.model and args.config:
        raise UsageError("give --model or --config, not both")
    config, fields = None, {}
    if args.model:
        config = get_variant(args.model).config(hidden_act="quick_gelu")
    elif args.config:
        data = weights.read_json(args.config)
        if isinstance(data, dict) and convert.is_original_spec(data):
            fields = convert.spec_fields(data)  # the label count comes from the checkpoint
        else:
            config = weights.read_config(args.config)
    config = weights.convert_original(args.checkpoint, args.output_dir, CvtForImageClassification,
                                      config=config, **fields)
    # the preprocessing the folder will be run with travels with its weights: the variant's, or
    # CvT's standard one at --image-size; without either, predict asks for --image-size
    if args.model or args.image_size:
        CvtImageProcessor.for_model(args.model or args.checkpoint, args.image_size).save_pretrained(args.output_dir)
    else:
        print("no --model or --image-size: the folder carries no preprocessing (give --image-size "
              "to cvt predict and eval)", file=sys.stderr)
    print(f"wrote {args.output_dir} ({config.num_stages} stages, depths {list(config.depth)}, "
          f"widths {list(config.embed_dim)}, {config.num_labels} labels, {config.hidden_act})")
    return 0


def _load_model(source: str) -> CvtModel | CvtForImageClassification:
    """A classifier for a checkpoint with a head, else a backbone (never a random head)."""
    stored, state_dict = weights.resolve(source)
    with_head = any(key.split(".")[0] in ("classifier", "head") for key in state_dict)
    model_class = CvtForImageClassification if with_head else CvtModel
    return weights.build_from_state_dict(model_class, state_dict, source, stored=stored, config=None,
                                         ignore_mismatched_sizes=False)


def cmd_export(args: argparse.Namespace) -> int:
    model = _load_model(args.model)  # a classifier exports its logits; a backbone its features
    image_size = args.image_size or _processor_image_size(args.model)  # a variant name: offline
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


def cmd_attention(args: argparse.Namespace) -> int:
    if args.head is not None and args.rollout:
        raise UsageError("give --head or --rollout, not both")
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size must be a positive number of pixels, got {args.size}")
    if Path(args.output).suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, got {args.output}")
    model = _load_model(args.model)
    maps = attention.attention_maps(model, args.image, CvtImageProcessor.for_model(args.model, args.image_size))
    which = "rollout" if args.rollout else ("mean" if args.head is None else args.head)
    if isinstance(which, int) and not 0 <= which < len(maps.heads):
        raise UsageError(f"--head {which}: the last stage has heads 0-{len(maps.heads) - 1}")
    picture = attention.draw(maps, which, size=args.size)
    write_atomic(args.output, lambda tmp: picture.save(tmp, format="PNG"))
    source = "from the cls token" if maps.cls_token else "received by each position"
    shown = {"rollout": "attention rollout", "mean": "mean over heads"}.get(which, f"head {which}")
    print(f"wrote {args.output} ({picture.width}x{picture.height}): last stage's attention {source}, {shown}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    with messages_on_stderr():
        return predict.run(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                           device=args.device, fmt=args.format, output=args.output,
                           engine=args.engine, precision=args.precision,
                           calibration=args.calibration, image_size=args.image_size,
                           ray=args.ray, workers=args.workers)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS] and --workers N (`cvt serve` takes the same --ray)."""
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run on Ray: alone, a private Ray instance on this machine; with the "
                        "HOST:PORT that `ray start --head` printed, that cluster (write it after the inputs)")
    parser.add_argument("--workers", type=int, metavar="N", help="with --ray: N actors, one model "
                        "each, 1 CPU each (default: one per CPU of the cluster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT image models: inspect, convert, "
                                     "classify, train, export, benchmark.")
    parser.add_argument("--version", action="version", version=f"cvt {importlib.metadata.version(DISTRIBUTION)}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="architecture, parameters and multiply-adds of a model")
    info.add_argument("model", help="variant name (e.g. cvt-13), checkpoint folder or config.json")
    info.add_argument("--image-size", type=int, help="input size (default: the model's own)")
    info.set_defaults(run=cmd_info)

    conv = sub.add_parser("convert", help="original microsoft/CvT .pth -> transformers-layout folder")
    conv.add_argument("checkpoint", help="original checkpoint file (.pth)")
    conv.add_argument("output_dir", help="folder to write config.json and model.safetensors to")
    conv.add_argument("--model", choices=list(VARIANTS), help="architecture of a released variant")
    conv.add_argument("--config", help="config.json, or the original MODEL.SPEC as JSON")
    conv.add_argument("--image-size", type=int, help="input size the checkpoint was trained at: "
                      "writes CvT's standard preprocessing for it (default: the variant's)")
    conv.set_defaults(run=cmd_convert)

    add_training_parsers(sub)  # train, eval, demo

    pred = sub.add_parser("predict", help="classify images: top-k labels per file",
                          description="Classify image files, and the images found (recursively) in "
                          "folders. Exit status 1: some files could not be classified.")
    pred.add_argument("model", help="variant name (cvt-13: its published weights), hub id, "
                      "checkpoint folder or weights file (.pth, .safetensors)")
    pred.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                      help="image files, and folders searched recursively for images")
    pred.add_argument("--top-k", type=int, default=5, help="labels per image (default: 5)")
    pred.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    pred.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda or mps if available)")
    pred.add_argument("--format", choices=predict.FORMATS, default="table", help="default: table")
    pred.add_argument("--output", help="write the results to this file instead of stdout")
    pred.add_argument("--image-size", type=int, help="input size (default: the model's own "
                      "preprocessing; needed for a weights file, which carries none)")
    add_ray_arguments(pred)
    add_engine_arguments(pred)
    pred.set_defaults(run=cmd_predict)

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
    exp.add_argument("--batch-size", type=int, help="fix the batch size (default: a dynamic batch axis)")
    exp.add_argument("--dynamic-size", action="store_true", help="symbolic height and width: one file "
                     "serves several input sizes (--image-size is then the size traced and checked)")
    exp.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    exp.add_argument("--no-check", action="store_true", help="skip the check of the written file's outputs")
    exp.set_defaults(run=cmd_export)

    att = sub.add_parser("attention", help="draw what a model attends to over an image",
                         description="Draw the last stage's attention over the image the model saw: "
                         "from the cls token (or, without one, the mean attention each position "
                         "receives), averaged over heads (default), one head, or rolled out "
                         "through the stage's layers.")
    att.add_argument("model", help="variant name, hub id, checkpoint folder or weights file")
    att.add_argument("image", help="the image file")
    att.add_argument("--output", required=True, help="the PNG file to write")
    att.add_argument("--head", type=int, help="draw this head of the last layer (default: the mean over heads)")
    att.add_argument("--rollout", action="store_true", help="draw attention rollout through the stage's layers")
    att.add_argument("--size", type=int, help="output width and height in pixels (default: the model's input size)")
    att.add_argument("--image-size", type=int, help="input size (default: the model's own preprocessing; "
                     "needed for a weights file, which carries none)")
    att.set_defaults(run=cmd_attention)

    bench = sub.add_parser("bench", help="speed and memory of every engine against transformers' CvT",
                           description=benchmark.__doc__.split("\n\n")[0])
    benchmark.add_arguments(bench)
    bench.set_defaults(run=benchmark.run_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring for the error policy)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as err:
        print(f"cvt: interrupted{f' {err}' if str(err) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        expected = isinstance(err, EXPECTED_ERRORS)
        if args.debug or not expected:
            traceback.print_exc()
        if expected:
            print(f"cvt: error: {err}", file=sys.stderr)
            return EXIT_ERROR
        print(f"cvt: internal error ({type(err).__name__}): this is a bug in cvt; please report it "
              f"with the traceback above", file=sys.stderr)
        return EXIT_BUG


def entry() -> None:
    """The `cvt` command (and `python -m cvt`): `main`'s status as the process's. On Ctrl-C the
    process ends at once, not waiting for a thread blocked reading a slow file."""
    status = main()
    if status == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
