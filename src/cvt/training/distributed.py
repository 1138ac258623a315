"""One process or many: torchrun's environment, the device, and reductions across ranks.

Under `torchrun` (WORLD_SIZE > 1) the default process group is started with NCCL when each
process has a GPU and gloo otherwise. Without it every helper degrades to the single-process case.
A launcher's variables that no launcher set (a `RANK=1` left in a shell would make the process a
silent non-main rank) or that are malformed are an error naming them, before anything runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InvalidValueError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over all ranks (in place; returned for chaining)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, value: float) -> float:
        return self.sum(torch.tensor([value], dtype=torch.float64, device=self.device)).item() / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")  # what torchrun (any launcher) sets beside them


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as a launcher set them ((0, 1, 0) without one). Malformed
    values, a rank outside the world, or several processes without a launcher's rendezvous
    address are an `InvalidValueError` naming the variables."""
    given = {name: os.environ[name] for name in LAUNCH_VARIABLES if name in os.environ}
    values = {}
    for name, default in zip(LAUNCH_VARIABLES, (0, 1, 0)):
        text = given.get(name, str(default)).strip()
        if not (text.isascii() and text.isdigit()):
            raise InvalidValueError(f"the environment variable {name}={given[name]!r} is not a whole number "
                                    f"0 or more; unset it, or start cvt with torchrun")
        values[name] = int(text)
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    shown = " ".join(f"{name}={value}" for name, value in given.items())
    missing = [name for name in RENDEZVOUS_VARIABLES if not os.environ.get(name)]
    if world_size < 1:
        why = "a world of no processes"
    elif rank >= world_size:
        why = f"rank {rank} is outside a world of {world_size} process{'es' if world_size > 1 else ''}"
    elif world_size > 1 and missing:
        why = f"{' and '.join(missing)} not set: no launcher started this process"
    else:
        return rank, world_size, local_rank
    raise InvalidValueError(f"the environment says {shown} ({why}); unset {' and '.join(given)} to run "
                            f"one process, or start cvt with torchrun")


def start() -> Context:
    """The process group if torchrun started us (idempotent), the device and rank."""
    rank, world_size, local_rank = launch_environment()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        logging.getLogger("cvt").setLevel(logging.ERROR)  # rank 0 reports; the others only fail
    return Context(rank, world_size, device)


def stop(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
