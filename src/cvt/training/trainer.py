"""The training loop behind `cvt train` (the scoring, its validation and `cvt eval`, is `scoring`).

One code path for one process and for many (torchrun): every rank builds the same model and
data, a `ResumableSampler` gives each rank its share of one global shuffled order, and
DistributedDataParallel averages gradients. Only rank 0 writes files. A step is `batch_size`
images over all ranks and accumulation steps, so a run's weights do not depend on how many
processes computed them (up to float rounding, and BatchNorm statistics; see the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import CvtConfig
from ..constants import TRAINING_PRECISIONS
from ..modeling import CvtForImageClassification
from ..images.processing import CvtImageProcessor
from ..checkpoints.read import read_architecture
from . import distributed
from .augment import BatchMixer, soft_cross_entropy, train_transform
from .data import DataError, LabelledImages, ResumableSampler, TransformedImages, load_source, make_loader
from .optim import WarmupCosine, WeightEMA, parameter_groups
from .recipes import BOUNDS, Recipe, get_recipe
from .scoring import score
from .report import CURVES_NAME, METRICS_NAME, EvalResult, MetricsLog, plot_curves
from .folder import RunFolder, check_paths, lock_run_folder, remove_leftovers
from .state import (STATE_NAME, ResumeError, cvt_version, load_state, rng_state, save_state, set_rng_state,
                    written_by)
from ..errors import InvalidValueError

logger = logging.getLogger("cvt")


# Every option of `cvt train`, by what `--resume` does with it. Compared: the saved run's value
# (as the run used it: the resolved recipe, the model's architecture and classes, the data's
# classes and image counts) must equal the new command's, else the resumed run would not be the
# run it claims to continue. Result-neutral: may differ, the weights come out the same.
RESUME_COMPARED = frozenset({
    "model",  # its architecture and class list (the path may move)
    "data", "val_data",  # their class list and image counts (the paths may move)
    "val_split", "recipe", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
    "label_smoothing", "hflip", "mixup", "cutmix", "clip_grad", "ema_decay",
    "image_size",  # with the rest of the preprocessing
    "accum_steps", "precision", "freeze_backbone", "sync_bn", "seed"})
RESUME_NEUTRAL = {
    "output_dir": "it is where the run is", "resume": "it asks for the resume",
    "extend_epochs": "the one change a resume may make",
    "from_scratch": "the starting weights are replaced by the saved ones",
    "grad_checkpointing": "recomputes the same activations: the same weights",
    "workers": "data loading only", "save_every": "when states are saved, not what is trained",
    "stop_at_step": "when the run pauses, not what is trained",
}


@dataclass
class TrainOptions:
    """Everything `cvt train` accepts. Recipe fields left as None take the recipe's value."""

    model: str | CvtConfig  # hub id, folder, original .pth, variant name (its published weights) or a config
    data: Any  # folder, .csv/.jsonl, hf:<name>, or a datasets Dataset/DatasetDict
    output_dir: Path
    val_data: Any = None
    val_split: float = 0.1
    recipe: str | Recipe = "finetune"  # a name in RECIPES, or a Recipe
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # absolute peak learning rate (instead of the recipe's scaled one)
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    hflip: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    clip_grad: float | None = None
    ema_decay: float | None = None
    image_size: int | None = None
    accum_steps: int = 1
    precision: str = "fp32"
    freeze_backbone: bool = False
    from_scratch: bool = False  # random weights in the named model's architecture
    grad_checkpointing: bool = False  # recompute layers in backward: less memory, one more forward
    sync_bn: bool = False
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    seed: int = 0
    resume: bool = False
    extend_epochs: int | None = None  # with resume: N more epochs, the cosine re-planned over the new total
    save_every: int | None = None  # optimiser steps between saved states (besides each epoch end)
    stop_at_step: int | None = None  # save the state and return after this step (resume later)


# ---------------------------------------------------------------------------------------- model
def load_model(source: str | CvtConfig, classes: list[str], from_scratch: bool = False
               ) -> CvtForImageClassification:
    """The model to train, with a head for `classes`: `source`'s weights (a variant name means its
    published ones), or with `from_scratch` random weights in its architecture.

    A checkpoint whose labels are exactly `classes` keeps its head (and its label order: the data
    is re-indexed to it); otherwise only the classifier is replaced by a new one."""
    if isinstance(source, CvtConfig) or from_scratch:
        config = source if isinstance(source, CvtConfig) else read_architecture(source)
        return CvtForImageClassification(config.replace(id2label=dict(enumerate(classes))))
    model = CvtForImageClassification.from_pretrained(source)  # read once; a backbone gets a head
    if set(model.config.id2label.values()) == set(classes):
        return model
    logger.warning("%s: its %d labels are not the data's %d classes; the classifier starts anew",
                   source, model.config.num_labels, len(classes))
    model.reset_classifier(len(classes), labels=classes)
    return model


def _processor(options: TrainOptions) -> CvtImageProcessor:
    if not isinstance(options.model, CvtConfig):
        return CvtImageProcessor.for_model(options.model, options.image_size)
    if options.image_size is None:
        raise InvalidValueError("a model given as a CvtConfig carries no preprocessing; pass image_size")
    return CvtImageProcessor(size=options.image_size)


def _unwrap(model: nn.Module) -> CvtForImageClassification:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_model_folder(model: nn.Module, processor: CvtImageProcessor, folder: Path) -> None:
    """A transformers-layout folder `cvt predict` and `from_pretrained` read directly."""
    _unwrap(model).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------- training
def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_options(options: TrainOptions, device: torch.device) -> None:
    if options.precision not in TRAINING_PRECISIONS:
        raise InvalidValueError(f"--precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {options.precision!r}")
    if options.precision == "fp16" and device.type != "cuda":
        raise InvalidValueError("--precision fp16 needs a GPU (its grad scaler is CUDA-only); on CPU use bf16")
    if options.sync_bn and device.type != "cuda":
        raise InvalidValueError("--sync-bn needs GPUs (SyncBatchNorm runs on CUDA only)")
    for name, limits in BOUNDS.items():
        if getattr(options, name, None) is not None:
            limits.check(f"--{name.replace('_', '-')}", getattr(options, name))
    if options.extend_epochs is not None and not options.resume:
        raise InvalidValueError(f"--extend-epochs {options.extend_epochs} needs --resume")


def train(options: TrainOptions) -> EvalResult | None:
    """Run (or resume) a training run; returns the final validation result (None without one,
    or when `stop_at_step` stopped it within an epoch)."""
    ctx = distributed.start()
    folder = None
    try:
        run = _prepare(options, ctx)
        folder = run.folder = lock_run_folder(run.out) if ctx.is_main else None
        _resume(run, folder) if options.resume else _start(run, folder)
        result = None
        while run.step < run.total_steps:
            epoch = run.step // run.steps_per_epoch
            losses = _train_epoch(run, epoch)
            if losses is None:  # stopped at `stop_at_step` within the epoch
                return None
            result = _end_epoch(run, epoch, losses)
            _save(run)
            if options.stop_at_step is not None and run.step >= options.stop_at_step:
                break
        return result
    finally:
        if folder is not None:
            folder.release()
        distributed.stop(ctx)


@dataclass
class _Run:
    """Everything a training run holds while it runs; `step` and `best_top1` advance."""

    options: TrainOptions
    ctx: distributed.Context
    recipe: Recipe
    out: Path
    micro_batch: int
    model: CvtForImageClassification
    ddp_model: nn.Module
    processor: CvtImageProcessor
    train_set: TransformedImages
    sampler: ResumableSampler
    loader: Any
    val_images: LabelledImages | None
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: torch.amp.GradScaler | None
    ema: WeightEMA | None
    mixer: BatchMixer
    log: MetricsLog
    identity: dict[str, Any]  # what a saved state must agree with to be resumed
    step: int = 0
    best_top1: float = -1.0
    folder: RunFolder | None = None  # the locked --output-dir (rank 0)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.recipe.epochs

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def _recipe(options: TrainOptions) -> Recipe:
    """The named (or given) recipe with the options the user set."""
    base = options.recipe if isinstance(options.recipe, Recipe) else get_recipe(options.recipe)
    return base.replace(
        epochs=options.epochs, batch_size=options.batch_size, weight_decay=options.weight_decay,
        warmup_epochs=options.warmup_epochs, label_smoothing=options.label_smoothing,
        hflip=options.hflip, mixup=options.mixup, cutmix=options.cutmix,
        clip_grad=options.clip_grad, ema_decay=options.ema_decay)


def _prepare(options: TrainOptions, ctx: distributed.Context) -> _Run:
    """Data, model, optimiser and schedule of a run, before anything is trained or read back."""
    _check_options(options, ctx.device)
    recipe = _recipe(options)
    per_step = ctx.world_size * options.accum_steps
    if recipe.batch_size % per_step:
        raise InvalidValueError(f"--batch-size {recipe.batch_size} must be a multiple of processes x "
                         f"--accum-steps = {ctx.world_size} x {options.accum_steps}")
    micro_batch = recipe.batch_size // per_step

    torch.manual_seed(options.seed)
    train_images, val_images = load_source(options.data, options.val_data, options.val_split, options.seed)
    model = load_model(options.model, train_images.classes, options.from_scratch)
    model.set_grad_checkpointing(options.grad_checkpointing)
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    train_images = train_images.relabel(classes, "training data")
    val_images = val_images.relabel(classes, "validation data") if val_images is not None else None
    processor = _processor(options)

    train_set = TransformedImages(train_images, train_transform(recipe, processor), options.seed)
    sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, options.seed)
    loader = make_loader(train_set, micro_batch, sampler, options.workers, drop_last=True)
    steps_per_epoch = (sampler.num_samples // micro_batch) // options.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_images)} training images make no full step of {recipe.batch_size}; "
                        f"lower --batch-size")

    model, ddp_model = _place(model, options, ctx)
    peak_lr = options.lr if options.lr is not None else recipe.peak_lr(recipe.batch_size)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=peak_lr)
    schedule = _schedule(recipe, steps_per_epoch, peak_lr)
    scaler = torch.amp.GradScaler("cuda") if options.precision == "fp16" else None
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay else None
    identity = _identity(options, recipe, model.config, processor, peak_lr, train_images, val_images)
    identity["steps_per_epoch"] = steps_per_epoch
    out = Path(options.output_dir)
    return _Run(options, ctx, recipe, out, micro_batch, model, ddp_model, processor, train_set, sampler,
                loader, val_images, steps_per_epoch, optimizer, schedule, scaler, ema,
                BatchMixer(recipe, len(classes)), MetricsLog(out / METRICS_NAME), identity)


def _identity(options: TrainOptions, recipe: Recipe, config: CvtConfig, processor: CvtImageProcessor,
              peak_lr: float, train_images: LabelledImages, val_images: LabelledImages | None
              ) -> dict[str, Any]:
    """What a saved state must agree with to be resumed (RESUME_COMPARED), as plain values."""
    recipe_fields = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(recipe).items() if k not in ("lr", "lr_batch")}
    architecture = config.architecture()
    preprocessing = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(processor).items() if k != "size"}
    return {
        "classes": [config.id2label[i] for i in range(config.num_labels)], "model": architecture,
        "train_images": len(train_images), "val_images": len(val_images) if val_images is not None else 0,
        "val_split": options.val_split,
        "recipe": options.recipe if isinstance(options.recipe, str) else "(a Recipe object)",
        **recipe_fields, "lr": peak_lr, "image_size": processor.size, "preprocessing": preprocessing,
        "accum_steps": options.accum_steps, "precision": options.precision,
        "freeze_backbone": options.freeze_backbone, "sync_bn": options.sync_bn, "seed": options.seed,
    }


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested run record as dotted names."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _identity_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'name: saved run X, this command Y' for every setting that differs (nested ones dotted),
    and the settings a state saved by an earlier cvt did not record."""
    before, after = _flat(saved), _flat(now)
    differences = [f"{key}: saved run {before[key]!r}, this command {after[key]!r}"
                   for key in sorted(before.keys() & after.keys()) if before[key] != after[key]]
    unrecorded = sorted(after.keys() - before.keys())
    if unrecorded:
        differences.append(f"settings the saved run did not record (saved by an earlier cvt?): "
                           f"{', '.join(unrecorded)}")
    return differences


def _schedule(recipe: Recipe, steps_per_epoch: int, peak_lr: float) -> WarmupCosine:
    return WarmupCosine(peak_lr, steps_per_epoch * recipe.epochs, round(recipe.warmup_epochs * steps_per_epoch),
                        start=min(recipe.warmup_lr, peak_lr), floor=min(recipe.min_lr, peak_lr))


def _place(model: CvtForImageClassification, options: TrainOptions, ctx: distributed.Context
           ) -> tuple[nn.Module, nn.Module]:
    """The model on its device (frozen backbone, SyncBatchNorm as asked), and the module the
    steps call: DistributedDataParallel's wrapper under torchrun, else the model itself."""
    # the model computes in channels-last; weights laid out the same way get gradients in the
    # layout DistributedDataParallel's buckets expect
    model.to(ctx.device, memory_format=torch.channels_last)
    if options.freeze_backbone:
        model.cvt.requires_grad_(False)
    if options.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not ctx.distributed:
        return model, model
    return model, nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _start(run: _Run, folder: RunFolder | None) -> None:
    """A new run: its folder must not hold a saved state, nor files cvt cannot tell it wrote. A
    run killed before its first save (metrics but no state) is started again in place."""
    out = run.out
    if (out / STATE_NAME).exists():
        raise ResumeError(f"{out} already holds a training run; pass --resume to continue it or "
                          f"choose another --output-dir")
    if folder is not None:
        check_paths(folder, fresh=True)
        folder.claim()
        remove_leftovers(out)
        if (out / METRICS_NAME).exists():  # check_paths: of a cvt run started here that never saved
            logger.warning("%s holds the metrics of a run that never saved a state; starting it again",
                           out)
            (out / METRICS_NAME).unlink()
        logger.info("training on %d images of %d classes, validating on %s; %d epoch(s) x %d steps x "
                    "%d images, peak lr %.3g; %d process(es) on %s", len(run.train_set),
                    run.model.config.num_labels,
                    len(run.val_images) if run.val_images is not None else "none", run.recipe.epochs,
                    run.steps_per_epoch, run.recipe.batch_size, run.schedule.peak, run.ctx.world_size,
                    run.ctx.device.type)


def _resume(run: _Run, folder: RunFolder | None) -> None:
    """Read back the saved state of the same run; anything else is refused, naming each
    difference, before anything is changed."""
    path = run.out / STATE_NAME
    if not path.exists() and (run.out / METRICS_NAME).exists():
        raise ResumeError(f"cannot resume {run.out}: the run stopped before its first saved state; "
                          f"start it again without --resume")
    if folder is not None:
        check_paths(folder, fresh=False)
    state = load_state(path)
    unknown = sorted(_flat(state["run"]).keys() - _flat(run.identity).keys())
    if unknown:
        raise ResumeError(f"cannot resume {run.out}: its run records settings this cvt does not know "
                          f"({', '.join(unknown)}); it was written by {written_by(state)}, this is "
                          f"cvt {cvt_version()}; resume with the cvt that wrote it")
    differences = _identity_differences(state["run"], run.identity)
    if differences:
        raise ResumeError(f"cannot resume {run.out}: this command differs from the saved run in "
                          f"{'; '.join(differences)}; resume with the same settings (more epochs: "
                          f"--extend-epochs N)")
    extra = state["extra_epochs"] + (run.options.extend_epochs or 0)
    if extra:
        _extend(run, extra)
    if state["step"] >= run.total_steps:
        raise ResumeError(f"{run.out} holds a finished run ({run.total_steps} steps); continue it with "
                          f"--extend-epochs N")
    _restore(path, "model", lambda: run.model.load_state_dict(state["model"]))
    _restore(path, "optimizer", lambda: run.optimizer.load_state_dict(state["optimizer"]))
    if run.scaler is not None:
        _restore(path, "scaler", lambda: run.scaler.load_state_dict(state["scaler"]))
    if run.ema is not None:
        _restore(path, "ema", lambda: run.ema.load_state_dict(state["ema"]))
    _restore(path, "rng", lambda: set_rng_state(state["rng"][run.ctx.rank % len(state["rng"])]))
    run.step, run.best_top1 = state["step"], float(state["best_top1"])
    if folder is not None:
        folder.claim(saved=True)
        remove_leftovers(run.out)
        run.log.rewind(run.step)
        logger.info("resuming %s at step %d of %d", run.out, run.step, run.total_steps)


def _restore(path: Path, part: str, load: Callable[[], Any]) -> None:
    """Load one part of a saved state; a part that does not fit is a clear error."""
    try:
        load()
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise ResumeError(f"cannot resume from {path}: its {part!r} part does not fit this run "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _extend(run: _Run, extra_epochs: int) -> None:
    """The only change a resume may make: epochs beyond the planned ones (`--extend-epochs`,
    saved with the state), the cosine schedule re-planned over the new total."""
    run.recipe = run.recipe.replace(epochs=run.identity["epochs"] + extra_epochs)
    run.schedule = _schedule(run.recipe, run.steps_per_epoch, run.schedule.peak)


def _save(run: _Run) -> None:
    """The resumable state; every rank takes part (random states are gathered), rank 0 writes."""
    states = run.ctx.gather(rng_state())
    if not run.ctx.is_main:
        return
    save_state(run.out / STATE_NAME, {
        "step": run.step, "best_top1": run.best_top1, "run": run.identity, "rng": states,
        "extra_epochs": run.recipe.epochs - run.identity["epochs"],  # by --extend-epochs
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None})
    if run.folder is not None:
        run.folder.state_saved()


def _train_epoch(run: _Run, epoch: int) -> list[float] | None:
    """The rest of `epoch`'s steps; its step losses, or None when `stop_at_step` stopped it."""
    options, ctx = run.options, run.ctx
    first = run.step % run.steps_per_epoch
    run.train_set.epoch = epoch
    run.sampler.set_epoch(epoch)
    run.sampler.start = first * options.accum_steps * run.micro_batch
    run.ddp_model.train()
    if options.freeze_backbone:
        run.model.cvt.eval()  # frozen BatchNorm statistics and no stochastic depth in the backbone
    batches = iter(run.loader)
    # the epoch's mean training loss also counts steps run before an interruption
    losses = [r["loss"] for r in run.log.records() if r.get("epoch") == epoch + 1 and "loss" in r
              ] if first and ctx.is_main else []
    show = ctx.is_main and sys.stderr.isatty()
    with tqdm(total=run.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{run.recipe.epochs}",
              unit="step", disable=not show, leave=False) as bar:
        for _ in range(first, run.steps_per_epoch):
            started = time.perf_counter()
            lr = run.schedule(run.step)
            step_loss, images = _optimizer_step(run, batches, lr)
            images_per_s = ctx.sum(torch.tensor([float(images)], device=ctx.device)).item() / (
                time.perf_counter() - started)
            losses.append(step_loss)
            if ctx.is_main:
                run.log.append({"step": run.step, "epoch": epoch + 1, "loss": step_loss, "lr": lr,
                                "images_per_s": images_per_s})
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
            bar.update()
            end_of_epoch = run.step % run.steps_per_epoch == 0
            stopping = options.stop_at_step is not None and run.step >= options.stop_at_step
            if not end_of_epoch and (stopping or (options.save_every and run.step % options.save_every == 0)):
                _save(run)
            if stopping and not end_of_epoch:
                return None
    return losses


def _optimizer_step(run: _Run, batches: Any, lr: float) -> tuple[float, int]:
    """One optimiser step over `accum_steps` micro-batches: (its mean loss over all ranks, the
    images this rank saw)."""
    options, ctx = run.options, run.ctx
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    trainable = run.trainable
    loss_sum, images_seen = 0.0, 0
    for micro in range(options.accum_steps):
        images, labels = next(batches)
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        last_micro = micro == options.accum_steps - 1
        sync = contextlib.nullcontext() if last_micro or not ctx.distributed else run.ddp_model.no_sync()
        with sync:
            loss = _micro_step_loss(run.ddp_model, images, labels, run.mixer, run.recipe.label_smoothing,
                                    options.precision, ctx, trainable,
                                    seed=hash((options.seed, run.step, micro, ctx.rank)) % 2**63)
            scaled = loss / options.accum_steps
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.item()
        images_seen += len(images)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.recipe.clip_grad:
        torch.nn.utils.clip_grad_norm_(trainable, run.recipe.clip_grad)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    run.step += 1
    return ctx.mean(loss_sum / options.accum_steps), images_seen


def _end_epoch(run: _Run, epoch: int, losses: list[float]) -> EvalResult | None:
    """Validate, keep the best and the last model, log the epoch and redraw the curves."""
    eval_model = run.ema.model if run.ema is not None else run.model
    record: dict[str, Any] = {"epoch": epoch + 1, "step": run.step,
                              "train_loss": sum(losses) / len(losses) if losses else None}
    result = None
    if run.val_images is not None:
        result = evaluate(eval_model, run.val_images, run.processor, run.micro_batch, run.options.workers,
                          run.options.precision, run.ctx)
        record.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
        if result.top1 > run.best_top1:
            run.best_top1 = result.top1
            if run.ctx.is_main:
                save_model_folder(eval_model, run.processor, run.out / "best")
    if run.ctx.is_main:
        run.log.append(record)
        save_model_folder(eval_model, run.processor, run.out / "last")
        plot_curves(run.log.records(), run.out / CURVES_NAME)
        logger.info("epoch %d/%d: %s", epoch + 1, run.recipe.epochs,
                    ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))
    return result


def _micro_step_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mixer: BatchMixer,
                     label_smoothing: float, precision: str, ctx: distributed.Context,
                     trainable: list[nn.Parameter], seed: int) -> torch.Tensor:
    """The loss of one micro-batch; zero (with zero gradients) if every one of its images
    turned out unreadable when decoded."""
    if len(images) == 0:
        return sum(p.sum() for p in trainable) * 0.0
    if mixer.active:
        images, targets = mixer(images, labels, seed)
    with _autocast(precision, ctx.device):
        logits = model(images).logits
    if mixer.active:
        return soft_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------- validation
def evaluate(model: nn.Module, images: LabelledImages, processor: CvtImageProcessor, batch_size: int,
             workers: int, precision: str, ctx: distributed.Context) -> EvalResult:
    """`score` of the plain model in eval mode (under autocast at bf16/fp16), as validation
    during training measures it."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        with _autocast(precision, ctx.device):
            return model(batch).logits

    try:
        return score(logits_of, images, processor, batch_size, workers, ctx)
    finally:
        model.train(was_training)
