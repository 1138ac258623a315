"""`cvt info` (a model's architecture, parameters and multiply-adds) and `cvt convert` (an
original microsoft/CvT checkpoint -> a transformers-layout folder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..variants import VARIANTS
from .common import UsageError, processor_image_size


def add_parsers(sub: argparse._SubParsersAction) -> None:
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


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints import hub, read

    location = hub.locate(args.model)
    if location.variant is not None:
        variant = location.variant
        config, image_size = variant.config(), args.image_size or variant.image_size
        title = f"{variant.name} ({variant.pretraining} pre-training, ImageNet-1k top-1 {variant.top1} %)"
    elif location.kind == "file":
        if Path(location.where).suffix != ".json":
            raise UsageError(f"{args.model} is a weights file; cvt info reads a config.json, a "
                             f"checkpoint folder, a variant or a hub id")
        config, title = read.read_config(location.where), args.model
        image_size = args.image_size or processor_image_size(str(Path(location.where).parent))
    else:
        config, title = read.read_architecture(args.model), args.model
        image_size = args.image_size or processor_image_size(args.model)
    print(title)
    print(_describe(config, image_size))
    return 0


def _describe(config, image_size: int) -> str:
    import torch

    from ..config import kv_grid, stage_grids
    from ..modeling import CvtForImageClassification

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


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoints import convert, read, write
    from ..modeling import CvtForImageClassification
    from ..images.processing import CvtImageProcessor
    from ..variants import get_variant

    if args.model and args.config:
        raise UsageError("give --model or --config, not both")
    config, fields = None, {}
    if args.model:
        config = get_variant(args.model).config(hidden_act="quick_gelu")
    elif args.config:
        data = read.read_json(args.config)
        if isinstance(data, dict) and convert.is_original_spec(data):
            fields = convert.spec_fields(data)  # the label count comes from the checkpoint
        else:
            config = read.read_config(args.config)
    config = write.convert_original(args.checkpoint, args.output_dir, CvtForImageClassification,
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
