"""Side-by-side benchmark of this library's CvT against transformers' on the same weights.

Every side of a case runs alternately in one process (random order each round, after warm-up);
a side's speed-up is the median of its per-round time ratios to transformers, so slow drifts of
a shared machine hit all sides alike. Inference cases time transformers, the plain model
`model(x)`, each installed engine at fp32 (`cvt.engines`), onnxruntime and OpenVINO run by hand
on the same exported ONNX file, and the reduced precisions this machine has (bf16 where the CPU
has bf16 units; int8, calibrated on random images); the engine `engine="auto"` chooses for the
case is marked. Every fp32 side first checks that its logits equal transformers' within 1e-4
and the run stops loudly otherwise. What reduced precision costs is judged on a trained model
(random weights put the classes' logits close together): `cvt demo`'s digits CvT, trained once
and kept in the engine cache folder, scored on its held-out digits. Training runs in fp32 and,
where the CPU has bf16 units (or on a GPU), under bf16 autocast. Peak memory is measured in a
fresh process per model and case. On a CUDA machine the same cases run on the GPU (synchronised
timing, CUDA allocator peak).

Run with `cvt bench` (its options: `cvt bench --help`) or `python benchmarks/bench.py`; needs the
`bench` extra (the demo's digits model judges reduced precision; transformers is a dependency).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import CvtConfig
from ..constants import TOLERANCE
from ..engines import auto, build_engine
from ..engines.base import cpu_has_bf16, measure_precision
from ..engines.cache import cache_root
from ..engines.calibration import CalibrationSet, load_calibration
from ..engines.onnx_graph import compile_openvino, onnx_bytes
from ..files import write_json
from ..modeling import CvtForImageClassification
from ..images.processing import CvtImageProcessor
from ..training.demo import DEMO_CONFIG, DEMO_RECIPE, IMAGE_SIZE, write_digits
from ..training.trainer import TrainOptions, train



@dataclass(frozen=True)
class Case:
    name: str
    depth: tuple[int, int, int]
    image_size: int
    batch: int
    training: bool = False
    rounds: int = 5
    grad_checkpointing: bool = False
    precision: str = "fp32"  # training under bf16 autocast: where the CPU has bf16 units, or a GPU


CASES = [
    Case("CvT-13 224 b1", (1, 2, 10), 224, 1, rounds=25),
    Case("CvT-13 224 b32", (1, 2, 10), 224, 32, rounds=7),
    Case("CvT-13 384 b8", (1, 2, 10), 384, 8, rounds=7),
    Case("CvT-13 224 train b16", (1, 2, 10), 224, 16, training=True),
    Case("CvT-13 224 train b16 ckpt", (1, 2, 10), 224, 16, training=True, grad_checkpointing=True),
    Case("CvT-13 224 train b16 bf16", (1, 2, 10), 224, 16, training=True, precision="bf16"),
]
MEMORY_CASES = [c for c in CASES if c.name in ("CvT-13 224 b32", "CvT-13 224 train b16",
                                               "CvT-13 224 train b16 ckpt", "CvT-13 224 train b16 bf16",
                                               "CvT-13 384 b8")]


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


def _training_step(model, x: torch.Tensor, labels: torch.Tensor, precision: str) -> Callable[[], torch.Tensor]:
    """A training step, under bf16 autocast at bf16 (as `cvt train --precision bf16` runs)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=generator).to(device)
    return x, torch.randint(0, 1000, (case.batch,), generator=generator).to(device)


def _steps(case: Case, theirs, ours, device: torch.device):
    """transformers' and the plain model's step (inference logits, or a training step's loss)."""
    x, labels = _inputs(case, device)
    if case.training:
        return _training_step(theirs, x, labels, case.precision), _training_step(ours, x, labels, case.precision)
    return _inference_step(theirs, x), _inference_step(ours, x)


def _engine_sides(case: Case, ours, device: torch.device, folder: Path
                  ) -> tuple[dict[str, tuple[Callable, str]], str]:
    """(name -> (step, precision) for each installed engine at fp32, onnxruntime and OpenVINO
    run by hand on the same ONNX file, and the reduced precisions this machine has; the engine
    `auto` chose for the case's batch size)."""
    x, _ = _inputs(case, device)
    size = (case.image_size, case.image_size)
    sides: dict[str, tuple[Callable, str]] = {}
    for name in ("torch", "onnxruntime", "openvino"):
        if name == "torch" or importlib.util.find_spec(name):
            engine = build_engine(ours, name, device=device, image_size=size, cache_dir=folder)
            sides[f"engine {name}"] = (functools.partial(engine, x), "fp32")
    # measured here (the engines it times come from this run's cache), unless CVT_AUTO_ENGINE=order
    chosen = build_engine(ours, "auto", device=device, image_size=size, batch_size=case.batch,
                          cache_dir=folder).name
    if device.type == "cpu":
        onnx_file = folder / "model.onnx"
        onnx_file.write_bytes(onnx_bytes(ours, size))
        sides.update(_by_hand(onnx_file, x))
    calibration = CalibrationSet([(torch.randn(16, 3, *size), None) for _ in range(4)], "random")
    for name, precision in reduced_engines(device):
        engine = build_engine(ours, name, device=device, image_size=size, precision=precision,
                              calibration=calibration, cache_dir=folder)
        sides[f"engine {name} {precision}"] = (functools.partial(engine, x), precision)
    return sides, chosen


def reduced_engines(device: torch.device) -> list[tuple[str, str]]:
    """(engine, precision) for each installed reduced precision this machine has: bf16 where the
    CPU has bf16 units (OpenVINO, torch) or on a GPU (torch), int8 on a CPU (OpenVINO, onnxruntime)."""
    if device.type == "cuda":
        return [("torch", "bf16")]
    pairs = [("openvino", "bf16"), ("torch", "bf16")] if cpu_has_bf16() else []
    pairs += [("openvino", "int8"), ("onnxruntime", "int8")]
    return [(name, precision) for name, precision in pairs if name == "torch" or importlib.util.find_spec(name)]


def _by_hand(onnx_file: Path, x: torch.Tensor) -> dict[str, tuple[Callable, str]]:
    """onnxruntime and OpenVINO as a user would run the file: the runtime's own defaults, with
    OpenVINO asked for fp32 (its CPU default is bf16 or on-the-fly int8 where the CPU has them)."""
    array = x.cpu().numpy()
    sides: dict[str, tuple[Callable, str]] = {}
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        sides["onnxruntime by hand"] = (
            lambda: torch.from_numpy(session.run(None, {"pixel_values": array})[0]), "fp32")
    if importlib.util.find_spec("openvino"):
        compiled = compile_openvino(onnx_file)
        sides["openvino by hand"] = (lambda: torch.from_numpy(compiled({0: array})[0]), "fp32")
    return sides


def _compare(case: Case, name: str, reference: torch.Tensor, got: torch.Tensor, precision: str
             ) -> dict[str, float]:
    """fp32 sides must equal transformers within 1e-4 (or the run stops); a bf16 training step
    shows its loss's difference. Reduced-precision inference is judged on a trained model
    instead (`trained_quality`): random weights put every class's logit close together."""
    diff = (reference.float().cpu() - got.float().cpu()).abs().max().item()
    if precision == "fp32" and not diff <= TOLERANCE:
        raise SystemExit(f"{case.name}: {name}'s outputs differ by {diff:.2e} (> {TOLERANCE}); not benchmarking")
    return {"max_abs_diff": diff} if precision == "fp32" or case.training else {}


def digits_run(root: Path | None = None) -> Path:
    """A folder with `cvt demo`'s digits (data/train, data/val) and its CvT trained on them by
    the demo's recipe (best/): trained once (about a minute), then kept in the engine cache's
    folder (`root`) for every later run."""
    root = root or cache_root() / "bench"
    recipe = json.dumps([DEMO_CONFIG.to_dict(), repr(DEMO_RECIPE), IMAGE_SIZE], sort_keys=True, default=str)
    folder = root / f"digits-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if (folder / "best" / "config.json").is_file():
        return folder
    print(f"training the demo's digits CvT once for the reduced-precision rows (kept in {folder}) ...",
          file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".digits-") as tmp:
        kept = Path(tmp) / "kept"
        write_digits(kept / "data")
        train(TrainOptions(model=DEMO_CONFIG, data=kept / "data", output_dir=Path(tmp) / "run",
                           recipe=DEMO_RECIPE, image_size=IMAGE_SIZE, workers=1))
        (Path(tmp) / "run" / "best").rename(kept / "best")
        try:
            os.replace(kept, folder)
        except OSError:  # another run kept its model first
            if not (folder / "best" / "config.json").is_file():
                raise
    return folder


def trained_quality(device: torch.device, out=sys.stdout, root: Path | None = None) -> list[dict[str, Any]]:
    """What each reduced precision costs on a trained model: the demo's digits CvT on its
    held-out digits, int8 calibrated on its training digits; printed and returned as rows."""
    folder = digits_run(root)
    model = CvtForImageClassification.from_pretrained(str(folder / "best")).to(device).eval()
    processor = CvtImageProcessor.from_pretrained(str(folder / "best"))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    held_out = load_calibration(folder / "data" / "val", processor, labels, limit=100_000)
    print(f"\nreduced precision on a trained model: the demo's digits CvT, {held_out.images} held-out "
          f"images\n  {'side':<28}{'max |logit - fp32|':>20}{'top-1 agree':>13}{'top-1':>9}{'fp32 top-1':>12}",
          file=out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cvt-bench-") as engines_dir:
        for name, precision in reduced_engines(device):
            engine = build_engine(model, name, device=device, precision=precision, image_size=processor.size,
                                  calibration=folder / "data" / "train", processor=processor,
                                  cache_dir=engines_dir)
            report = measure_precision(engine, model, held_out.batches)
            rows.append({"trained_side": f"engine {name} {precision}", **asdict(report)})
            print(f"  {rows[-1]['trained_side']:<28}{report.max_abs_logit_error:>20.2e}"
                  f"{100 * report.top1_agreement:>11.1f} %{100 * report.accuracy:>7.1f} %"
                  f"{100 * report.fp32_accuracy:>10.1f} %", file=out, flush=True)
    return rows


def _timed(step: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def run_case(case: Case, device: torch.device, rounds: int | None = None, engines: bool = True
             ) -> list[dict[str, Any]]:
    """One row per side: median seconds, speed-up over transformers (median [min, max] of the
    per-round ratios) and its difference from transformers."""
    theirs, ours = build_pair(case, device)
    ours.set_grad_checkpointing(case.grad_checkpointing)
    step_theirs, step_ours = _steps(case, theirs, ours, device)
    sides = {"cvt" if case.training else "cvt model(x)": (step_ours, case.precision)}
    chosen = None
    with tempfile.TemporaryDirectory(prefix="cvt-bench-") as folder:
        if engines and not case.training:
            engine_sides, chosen = _engine_sides(case, ours, device, Path(folder))
            sides.update(engine_sides)
        reference = step_theirs()
        checks = {name: _compare(case, name, reference, step(), precision)
                  for name, (step, precision) in sides.items()}
        times = _alternate(step_theirs, sides, device, rounds or case.rounds, 2 if case.batch > 1 else 5)
    macs = CvtConfig(depth=case.depth, num_labels=1000).macs_per_image(case.image_size, case.image_size)
    flops = 2 * macs * case.batch * (3 if case.training else 1)
    rows = []
    for name, (_, precision) in sides.items():
        ratios = [a / b for a, b in zip(times["transformers"], times[name])]
        seconds = statistics.median(times[name])
        rows.append({
            "case": case.name, "side": name, "precision": precision, **checks[name],
            "transformers_s": statistics.median(times["transformers"]), "seconds": seconds,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "images_per_s": case.batch / seconds, "gflops": flops / seconds / 1e9,
            "auto_choice": name == f"engine {chosen}" and precision == "fp32",
        })
    return rows


def _alternate(step_theirs: Callable, sides: dict[str, tuple[Callable, str]], device: torch.device,
               rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each side's time per round, all sides in a new random order each round, after warm-up."""
    steps = [("transformers", step_theirs), *((name, step) for name, (step, _) in sides.items())]
    for _ in range(warmup):
        for _, step in steps:
            step()
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(rounds):
        rng.shuffle(steps)
        for name, step in steps:
            time.sleep(auto.PAUSE_S)  # the previous side's runtime parks its spinning threads
            times[name].append(_timed(step, device))
    return times


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
        model.set_grad_checkpointing(case.grad_checkpointing)
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
        [sys.executable, "-m", "cvt", "bench", "--memory", case.name, "--side", side],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"memory measurement of {case.name} ({side}) failed:\n{result.stderr}")
    return float(result.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU's model name, as `lscpu` gives it (Linux's /proc/cpuinfo), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_record() -> dict[str, str | None]:
    """What a results file names so its numbers can be quoted: the CPU, the date (UTC) and the
    commit of the code measured (`-dirty` with uncommitted changes; None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit}


def _machine() -> str:
    cpu = cpu_name()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return (f"{cpu}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")


def run(cases: list[Case], memory: bool, rounds: int | None, engines: bool = True,
        out=sys.stdout) -> list[dict[str, Any]]:
    device = _device()
    print(f"machine: {_machine()}", file=out)
    peak = gemm_peak(device)
    print(f"fp32 GEMM peak (2048x2048 mm, median): {peak:.0f} GFLOP/s", file=out)
    results = []
    for case in cases:
        if not _runs_here(case, device):
            print(f"\n{case.name}: skipped (this CPU has no bf16 units)", file=out)
            continue
        rows = run_case(case, device, rounds, engines=engines)
        results += rows
        _print_case(case, rows, peak, out)
    if engines and any(not case.training for case in cases) and reduced_engines(device):
        results += trained_quality(device, out)
    if memory:
        print(f"\n{'peak memory (MB)':<28}{'transformers':>13}{'cvt':>9}{'ratio':>10}", file=out)
        for case in (c for c in MEMORY_CASES if _runs_here(c, device)):
            a, b = _memory_in_subprocess(case, "transformers"), _memory_in_subprocess(case, "cvt")
            results.append({"memory_case": case.name, "transformers_mb": a, "cvt_mb": b, "ratio": b / a})
            print(f"{case.name:<28}{a:>13.0f}{b:>9.0f}{b / a:>9.2f}x", file=out, flush=True)
    return results


def _runs_here(case: Case, device: torch.device) -> bool:
    return case.precision == "fp32" or device.type == "cuda" or cpu_has_bf16()


def _print_case(case: Case, rows: list[dict[str, Any]], peak: float, out) -> None:
    print(f"\n{case.name}: transformers {rows[0]['transformers_s']:.3f} s", file=out)
    print(f"  {'side':<28}{'s':>8}{'speed-up':>10}{'[min-max]':>13}{'img/s':>8}{'% peak':>8}"
          f"{'max |diff|':>12}", file=out)
    for r in rows:
        spread = f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"  {r['side']:<28}{r['seconds']:>8.3f}{r['speedup']:>9.2f}x{spread:>13}"
              f"{r['images_per_s']:>8.1f}{100 * r['gflops'] / peak:>7.0f}%{diff:>12}"
              f"{'  (auto)' if r['auto_choice'] else ''}", file=out, flush=True)
    for verdict in (_engines_vs_by_hand(rows), _auto_verdict(rows)):
        if verdict:
            print(f"  {verdict}", file=out, flush=True)


def _engines_vs_by_hand(rows: list[dict[str, Any]]) -> str | None:
    """The fastest fp32 engine's time against the best runtime run by hand on the same file."""
    engines = [r for r in rows if r["side"].startswith("engine ") and r["precision"] == "fp32"]
    by_hand = [r for r in rows if r["side"].endswith(" by hand")]
    if not engines or not by_hand:
        return None
    ours, theirs = min(engines, key=lambda r: r["seconds"]), min(by_hand, key=lambda r: r["seconds"])
    change = 100 * (ours["seconds"] / theirs["seconds"] - 1)
    return (f"fastest fp32 engine: {ours['side']} {ours['speedup']:.2f}x transformers, "
            f"{abs(change):.1f} % {'slower' if change > 0 else 'faster'} than {theirs['side']}")


def _auto_verdict(rows: list[dict[str, Any]]) -> str | None:
    """Which engine `auto` chose, against the fastest fp32 engine in this run's rounds."""
    chosen = next((r for r in rows if r["auto_choice"]), None)
    if chosen is None:
        return None
    engines = [r for r in rows if r["side"].startswith("engine ") and r["precision"] == "fp32"]
    fastest = min(engines, key=lambda r: r["seconds"])
    how = "fixed order" if auto.mode() == "order" else "measured"
    if fastest is chosen:
        return f"auto chose {chosen['side']} ({how}): the fastest fp32 engine in these rounds"
    return (f"auto chose {chosen['side']} ({how}): {100 * (chosen['seconds'] / fastest['seconds'] - 1):.1f} % "
            f"slower than {fastest['side']} in these rounds")


def run_command(args: argparse.Namespace) -> int:
    """`cvt bench`: the cases named (default all), side by side with transformers' CvT."""
    by_name = {c.name: c for c in CASES}
    unknown = [name for name in args.case or () if name not in by_name]
    if unknown:
        print(f"cvt bench: no case {', '.join(map(repr, unknown))}; the cases are "
              f"{', '.join(map(repr, by_name))}", file=sys.stderr)
        return 2
    if args.memory:
        print(peak_memory(by_name[args.memory], args.side, _device()))
        return 0
    cases = [by_name[n] for n in args.case] if args.case else CASES
    results = run(cases, memory=not args.no_memory, rounds=args.rounds, engines=not args.no_engines)
    if args.json:
        write_json(args.json, {**run_record(), "machine": _machine(), "results": results})
    return 0
