"""What a run leaves for people to read: metrics.jsonl, curves.png, a confusion matrix, and the
evaluation result with its table."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidValueError, short
from ..files import write_atomic

logger = logging.getLogger("cvt")

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]; `confusion[true, predicted]` counts images."""

    top1: float
    top5: float
    loss: float
    count: int
    classes: list[str]
    confusion: torch.Tensor

    def per_class(self) -> dict[str, float | None]:
        """Each class's top-1 accuracy (None for a class without images)."""
        totals = self.confusion.sum(dim=1)
        return {name: (self.confusion[i, i].item() / totals[i].item() if totals[i] else None)
                for i, name in enumerate(self.classes)}

    def to_dict(self) -> dict[str, Any]:
        """What `cvt eval --format json` prints."""
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count,
                "per_class": self.per_class()}


class MetricsLog:
    """Append-only JSON lines: step records (`step`, `loss`, `lr`, `images_per_s`) and epoch
    records (`epoch`, `train_loss`, `val_loss`, `val_top1`, `val_top5`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        """Every record; a last line that is not one (a write torn by a crash) is left out, with a
        warning, and a bad line before it is an error naming it (the file is not a run's log)."""
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
        records = []
        for number, line in lines:
            record = _record(line)
            if record is None and number == lines[-1][0]:
                logger.warning("%s: its last line is not a whole record (a write cut short?); left out",
                               short(self.path))
            elif record is None:
                raise InvalidValueError(f"{short(self.path)}: line {number} is not a JSON record of a "
                                        f"training run; move the file away or restore it")
            else:
                records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Forget records written after `step` (by a run that died before its next saved state)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

        write_atomic(self.path, write)


def _record(line: str) -> dict[str, Any] | None:
    """One line of metrics.jsonl as its record, or None when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def _save(fig, plt, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_curves(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Training loss per step and validation loss per epoch; validation top-1/top-5 per epoch."""
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "train_loss" in r]
    plt, (fig, (ax_loss, ax_acc)) = _figure(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train (per step)")
    with_val = [r for r in epochs if r.get("val_loss") is not None]
    ax_loss.plot([r["step"] for r in with_val], [r["val_loss"] for r in with_val], "o-", label="validation")
    ax_loss.set(xlabel="optimiser step", ylabel="loss", title="loss")
    ax_loss.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_loss.legend()
    for key in ("val_top1", "val_top5"):
        ax_acc.plot([r["epoch"] for r in with_val], [r[key] for r in with_val], "o-", label=key)
    # headroom above 1.0 and the legend below the lines: a top-5 of 1.0 stays visible
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.05), title="validation accuracy")
    ax_acc.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole numbers
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, plt, path)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    """Rows: true class, columns: predicted class, counts written in the cells, a colour bar,
    and the overall accuracy in the title."""
    plt, (fig, ax) = _figure(figsize=(max(4.5, 2 + 0.5 * len(classes)), max(3.5, 1.2 + 0.5 * len(classes))))
    image = ax.imshow(confusion.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    accuracy = confusion.diag().sum().item() / max(1, confusion.sum().item())
    ax.set(xlabel="predicted", ylabel="true",
           title=f"confusion matrix\ntop-1 {100 * accuracy:.2f} % of {int(confusion.sum().item())} images")
    high = confusion.max().item() / 2
    for (i, j), count in zip(torch.cartesian_prod(torch.arange(len(classes)), torch.arange(len(classes))).tolist(),
                             confusion.flatten().tolist()):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > high else "black")
    fig.tight_layout()
    _save(fig, plt, path)


def format_table(result: EvalResult) -> str:
    counts = result.confusion.sum(dim=1).tolist()
    width = max(12, *(len(name) for name in result.classes)) + 2
    lines = [f"images {result.count}   top-1 {result.top1:.4f}   top-5 {result.top5:.4f}   "
             f"loss {result.loss:.4f}", "", f"{'class':<{width}}{'accuracy':>9}{'images':>8}"]
    for (name, accuracy), count in zip(result.per_class().items(), counts):
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        lines.append(f"{name:<{width}}{shown:>9}{count:>8}")
    return "\n".join(lines)
