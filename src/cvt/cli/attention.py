"""`cvt attention`: draws what a model's last stage attends to over an image (the work is
`cvt.modeling.attention_maps`'s)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import PICTURE_SIZE_RANGE
from .common import UsageError


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    att.add_argument("--size", type=int, help=f"output width and height in pixels, {PICTURE_SIZE_RANGE[0]} to "
                     f"{PICTURE_SIZE_RANGE[1]} (what drawing fits in about 0.55 GB; default: the model's input size)")
    att.add_argument("--image-size", type=int, help="input size (default: the model's own preprocessing; "
                     "needed for a weights file, which carries none)")
    att.set_defaults(run=cmd_attention)


def cmd_attention(args: argparse.Namespace) -> int:
    from ..modeling import attention_maps
    from ..modeling.factory import load
    from ..files import write_atomic
    from ..predict import check_output
    from ..images.processing import CvtImageProcessor

    if args.head is not None and args.rollout:
        raise UsageError("give --head or --rollout, not both")
    if Path(args.output).suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, got {args.output}")
    check_output(Path(args.output), args.model, [Path(args.image)])
    model = load(args.model)
    maps = attention_maps.attention_maps(model, args.image, CvtImageProcessor.for_model(args.model, args.image_size))
    which = "rollout" if args.rollout else ("mean" if args.head is None else args.head)
    if isinstance(which, int) and not 0 <= which < len(maps.heads):
        raise UsageError(f"--head {which}: the last stage has heads 0-{len(maps.heads) - 1}")
    picture = attention_maps.draw(maps, which, size=args.size)
    write_atomic(args.output, lambda tmp: picture.save(tmp, format="PNG"))
    source = "from the cls token" if maps.cls_token else "received by each position"
    shown = {"rollout": "attention rollout", "mean": "mean over heads"}.get(which, f"head {which}")
    print(f"wrote {args.output} ({picture.width}x{picture.height}): last stage's attention {source}, {shown}")
    return 0
