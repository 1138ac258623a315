"""Side-by-side benchmark of this library's CvT against transformers' on the same weights.

Both models run alternately in one process (random order each round, after warm-up); a case's
speed-up is the median of the per-round time ratios, so slow drifts of a shared machine hit both
sides alike. Every case first checks that both produce the same logits (or loss) within 1e-4 and
stops loudly otherwise. Peak memory is measured in a fresh process per model and case. On a CUDA
machine the same cases run on the GPU (timed with synchronisation, memory from the CUDA allocator).

Run with `cvt bench` or `python benchmarks/bench.py`; transformers must be installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import CvtConfig
from .modeling import CvtForImageClassification
from .weights import write_json

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    depth: tuple[int, int, int]
    image_size: int
    batch: int
    training: bool = False
    rounds: int = 5


CASES = [
    Case("CvT-13 224 b1", (1, 2, 10), 224, 1, rounds=30),
    Case("CvT-13 224 b32", (1, 2, 10), 224, 32),
    Case("CvT-21 224 b32", (1, 4, 16), 224, 32),
    Case("CvT-13 384 b8", (1, 2, 10), 384, 8),
    Case("CvT-13 224 train b16", (1, 2, 10), 224, 16, training=True),
]
MEMORY_CASES = [c for c in CASES if c.name in ("CvT-13 224 b32", "CvT-13 224 train b16", "CvT-13 384 b8")]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pair(case: Case, device: torch.device, seed: int = 0):
    """transformers' and our classifier holding identical random weights and BatchNorm statistics."""
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.CvtConfig(depth=list(case.depth), num_labels=1000,
                                       drop_path_rate=[0.0, 0.0, 0.0])
    theirs = transformers.CvtForImageClassification(hf_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in theirs.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean") or (name.endswith("bias") and tensor.dim() == 1):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    ours = CvtForImageClassification(CvtConfig(depth=case.depth, num_labels=1000,
                                               drop_path_rate=(0.0, 0.0, 0.0)))
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(device), ours.to(device)


def _inference_step(model, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.eval()

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model(x).logits

    return step


def _training_step(model, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _steps(case: Case, theirs, ours, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=generator).to(device)
    if case.training:
        labels = torch.randint(0, 1000, (case.batch,), generator=generator).to(device)
        return _training_step(theirs, x, labels), _training_step(ours, x, labels)
    return _inference_step(theirs, x), _inference_step(ours, x)


def _check_agreement(case: Case, step_theirs, step_ours) -> float:
    """Both sides compute the same thing: logits (or, training, the first loss) within 1e-4."""
    a, b = step_theirs().float().cpu(), step_ours().float().cpu()
    diff = (a - b).abs().max().item()
    if not diff <= TOLERANCE:
        raise SystemExit(f"{case.name}: outputs differ by {diff:.2e} (> {TOLERANCE}); not benchmarking")
    return diff


def _timed(step: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def run_case(case: Case, device: torch.device, rounds: int | None = None) -> dict[str, Any]:
    theirs, ours = build_pair(case, device)
    step_theirs, step_ours = _steps(case, theirs, ours, device)
    diff = _check_agreement(case, step_theirs, step_ours)  # also the first warm-up
    for _ in range(2 if case.batch > 1 else 5):
        step_theirs(), step_ours()
    rng = random.Random(0)
    times_theirs, times_ours, ratios = [], [], []
    for _ in range(rounds or case.rounds):
        order = [("theirs", step_theirs), ("ours", step_ours)]
        rng.shuffle(order)
        measured = {side: _timed(step, device) for side, step in order}
        times_theirs.append(measured["theirs"])
        times_ours.append(measured["ours"])
        ratios.append(measured["theirs"] / measured["ours"])
    macs = CvtConfig(depth=case.depth, num_labels=1000).macs_per_image(case.image_size, case.image_size)
    flops = 2 * macs * case.batch * (3 if case.training else 1)
    return {
        "case": case.name, "max_abs_diff": diff,
        "transformers_s": statistics.median(times_theirs), "cvt_s": statistics.median(times_ours),
        "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
        "cvt_images_per_s": case.batch / statistics.median(times_ours),
        "cvt_gflops": flops / statistics.median(times_ours) / 1e9,
        "transformers_gflops": flops / statistics.median(times_theirs) / 1e9,
    }


def gemm_peak(device: torch.device, n: int = 2048, repeats: int = 9) -> float:
    """Median GFLOP/s of an n x n fp32 matrix product: the roof the model runs under."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    rates = [2 * n**3 / _timed(lambda: torch.mm(a, b), device) / 1e9 for _ in range(repeats)]
    return statistics.median(rates)


def peak_memory(case: Case, side: str, device: torch.device) -> float:
    """Peak memory (MB) of three steps of one side, measured in this (fresh) process; only that
    side's model is built (both processes import transformers, so the baselines are alike)."""
    if side == "transformers":
        model = build_pair(case, device)[0]
    else:
        model = CvtForImageClassification(CvtConfig(depth=case.depth, num_labels=1000)).to(device)
    step = _steps(case, model, model, device)[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the current program image;
    ru_maxrss would carry over the (larger) parent's peak across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_in_subprocess(case: Case, side: str) -> float:
    result = subprocess.run(
        [sys.executable, "-m", "cvt.benchmark", "--memory", case.name, "--side", side],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"memory measurement of {case.name} ({side}) failed:\n{result.stderr}")
    return float(result.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return (f"{cpu}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")


def run(cases: list[Case], memory: bool, rounds: int | None, out=sys.stdout) -> list[dict[str, Any]]:
    device = _device()
    print(f"machine: {_machine()}", file=out)
    peak = gemm_peak(device)
    print(f"fp32 GEMM peak (2048x2048 mm, median): {peak:.0f} GFLOP/s", file=out)
    header = (f"{'case':<22}{'transformers s':>15}{'cvt s':>9}{'speed-up':>10}{'[min-max]':>13}"
              f"{'cvt img/s':>11}{'cvt GFLOP/s':>13}{'% peak':>8}{'max |diff|':>12}")
    print(header, file=out, flush=True)
    results = []
    for case in cases:
        r = run_case(case, device, rounds)
        results.append(r)
        spread = f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"
        print(f"{r['case']:<22}{r['transformers_s']:>15.3f}{r['cvt_s']:>9.3f}{r['speedup']:>9.2f}x"
              f"{spread:>13}{r['cvt_images_per_s']:>11.1f}"
              f"{r['cvt_gflops']:>13.0f}{100 * r['cvt_gflops'] / peak:>7.0f}%{r['max_abs_diff']:>12.1e}",
              file=out, flush=True)
    if memory:
        print(f"\n{'peak memory (MB)':<22}{'transformers':>15}{'cvt':>9}{'ratio':>10}", file=out)
        for case in MEMORY_CASES:
            a, b = _memory_in_subprocess(case, "transformers"), _memory_in_subprocess(case, "cvt")
            results.append({"memory_case": case.name, "transformers_mb": a, "cvt_mb": b})
            print(f"{case.name:<22}{a:>15.0f}{b:>9.0f}{b / a:>9.2f}x", file=out, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvt bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES],
                        help="run only this case (repeatable; default: all)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: per case)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one memory measurement
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("cvt bench compares against transformers: pip install 'transformers>=5'", file=sys.stderr)
        return 2
    by_name = {c.name: c for c in CASES}
    if args.memory:
        print(peak_memory(by_name[args.memory], args.side, _device()))
        return 0
    cases = [by_name[n] for n in args.case] if args.case else CASES
    results = run(cases, memory=not args.no_memory, rounds=args.rounds)
    if args.json:
        write_json(args.json, {"machine": _machine(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
