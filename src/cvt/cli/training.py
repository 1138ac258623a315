"""`cvt train`, `cvt eval` and `cvt demo`: argument parsing and printing around `cvt.training`.

All three run unchanged under `torchrun` (`torchrun --nproc_per_node N -m cvt train ...`); only
rank 0 prints results.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..constants import EVAL_BATCH_SIZE, TRAINING_PRECISIONS
from ..training.recipes import BOUNDS, RECIPES
from .common import add_engine_arguments, bounded, messages_on_stderr, run_settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_eval_and_demo(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="fine-tune or train a CvT on labelled images (torchrun for DDP)",
                        description="Fine-tune a checkpoint or train a variant from scratch. Recipe "
                                    "values are overridden by the options given.")
    tr.add_argument("--model", required=True,
                    help="variant name (cvt-13: its published weights), hub id (microsoft/cvt-13), "
                         "checkpoint folder, original .pth, or a config.json with --from-scratch")
    tr.add_argument("--from-scratch", action="store_true",
                    help="random weights in the architecture --model names (no download)")
    tr.add_argument("--data", required=True,
                    help="image folder (<class>/ subfolders, or train/ and val/), a .csv/.jsonl of "
                         "path,label, or hf:<datasets name or saved folder>")
    tr.add_argument("--output-dir", required=True, type=Path, help="where best/, last/, metrics go")
    tr.add_argument("--val-data", help="separate validation data (any layout --data accepts)")
    tr.add_argument("--val-split", type=_number("val_split"), default=0.1,
                    help="fraction of each class held out when the data has no validation part "
                         "(default 0.1; 0: no validation)")
    tr.add_argument("--recipe", choices=list(RECIPES), default="finetune",
                    help="finetune (default): short, low learning rate; paper: the original "
                         "ImageNet training from scratch")
    tr.add_argument("--epochs", type=_number("epochs"),
                    help="passes over the training data (default: the recipe's)")
    tr.add_argument("--batch-size", type=_number("batch_size"),
                    help="images per optimiser step over all processes")
    tr.add_argument("--lr", type=_number("lr"),
                    help="peak learning rate (default: the recipe's, scaled by batch)")
    tr.add_argument("--weight-decay", type=_number("weight_decay"),
                    help="AdamW weight decay (not on norms, biases, cls tokens)")
    tr.add_argument("--warmup-epochs", type=_number("warmup_epochs"),
                    help="linear learning-rate warm-up before the cosine decay")
    tr.add_argument("--label-smoothing", type=_number("label_smoothing"),
                    help="cross-entropy label smoothing (0: off)")
    tr.add_argument("--hflip", type=_number("hflip"), help="horizontal flip probability (0 for text, digits)")
    tr.add_argument("--mixup", type=_number("mixup"), help="MixUp alpha (0: off)")
    tr.add_argument("--cutmix", type=_number("cutmix"), help="CutMix alpha (0: off)")
    tr.add_argument("--clip-grad", type=_number("clip_grad"), help="maximum gradient norm")
    tr.add_argument("--ema-decay", type=_number("ema_decay"), help="keep an EMA of the weights (e.g. 0.9998)")
    tr.add_argument("--image-size", type=int, help="input size (default: the model's preprocessing)")
    tr.add_argument("--accum-steps", type=_number("accum_steps"), default=1,
                    help="gradient accumulation steps")
    tr.add_argument("--precision", choices=TRAINING_PRECISIONS, default="fp32",
                    help="bf16: autocast on CPU or GPU; fp16: autocast with a grad scaler (GPU)")
    tr.add_argument("--freeze-backbone", action="store_true", help="train only the head: final LayerNorm and classifier (linear probe)")
    tr.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute each layer in backward: much less memory for one more forward pass")
    tr.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun")
    tr.add_argument("--workers", type=_number("workers"), default=min(4, os.cpu_count() or 1),
                    help="DataLoader worker processes per training process")
    tr.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and "
                    "augmentation (default 0): the same seed gives the same run")
    tr.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir")
    tr.add_argument("--extend-epochs", type=_number("extend_epochs"), metavar="N",
                    help="with --resume: train N epochs more than planned (a finished run too), "
                         "the cosine schedule re-planned over the new total")
    tr.add_argument("--save-every", type=_number("save_every"),
                    help="also save the resumable state every N steps")
    tr.add_argument("--stop-at-step", type=_number("stop_at_step"),
                    help="save the state and stop after step N (continue later with --resume)")
    tr.set_defaults(run=cmd_train)


def _add_eval_and_demo(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="top-1/top-5/loss and per-class accuracy of a model on labelled images")
    ev.add_argument("--model", required=True, help="checkpoint folder, weights file, hub id or "
                    "variant name (cvt-13: its published weights)")
    ev.add_argument("--image-size", type=int, help="input size (default: the model's own "
                    "preprocessing; needed for a weights file, which carries none)")
    ev.add_argument("--data", required=True, help="folder of class subfolders, or any layout train accepts")
    ev.add_argument("--format", choices=("table", "json"), default="table", help="default: table")
    ev.add_argument("--batch-size", type=_number("batch_size"), default=EVAL_BATCH_SIZE,
                    help=f"images per forward pass (default {EVAL_BATCH_SIZE})")
    ev.add_argument("--workers", type=_number("workers"), default=min(4, os.cpu_count() or 1),
                    help="DataLoader worker processes decoding images")
    add_engine_arguments(ev)
    ev.set_defaults(run=cmd_eval)

    demo = sub.add_parser("demo", help="offline: train a compact CvT on scikit-learn's digits, "
                                       "evaluate it and classify held-out images")
    demo.add_argument("--output-dir", type=Path, default=Path("cvt-demo"),
                      help="where the data, the run and the plots go (default ./cvt-demo)")
    demo.add_argument("--epochs", type=_number("epochs"), default=None,
                      help="training epochs (default: the demo's)")
    demo.add_argument("--workers", type=_number("workers"), default=min(2, os.cpu_count() or 1),
                      help="DataLoader worker processes decoding images")
    demo.set_defaults(run=cmd_demo)


def _number(name: str):
    """The argparse type of the number BOUNDS names: outside its range, one line and exit 2."""
    return bounded(BOUNDS[name])


def _is_main_process() -> bool:
    from ..training.distributed import launch_environment

    return launch_environment()[0] == 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.trainer import TrainOptions, train

    fields = {k: v for k, v in vars(args).items() if k in TrainOptions.__dataclass_fields__}
    with messages_on_stderr():
        result = train(TrainOptions(**fields))
    if _is_main_process():
        where = args.output_dir.resolve()
        if result is None:
            print(f"saved the training state in {where}; continue with --resume")
        else:
            print(f"validation top-1 {result.top1:.4f}, top-5 {result.top5:.4f}, loss {result.loss:.4f}; "
                  f"models in {where / 'best'} and {where / 'last'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..training.report import format_table
    from ..training.scoring import evaluate_model

    with messages_on_stderr():
        result = evaluate_model(args.model, args.data, run_settings(args), workers=args.workers)
    if _is_main_process():
        print(json.dumps(result.to_dict(), indent=2) if args.format == "json" else format_table(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..training.demo import run_demo

    with messages_on_stderr():
        run_demo(args.output_dir, epochs=args.epochs, workers=args.workers)
    return 0
