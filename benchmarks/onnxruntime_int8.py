"""Which onnxruntime int8 is worth having: static QDQ and QOperator (calibrated), per-channel or
per-tensor weights, all operators or only MatMul/Gemm (softmax and LayerNorm left in fp32), with
or without the convolutions, and dynamic quantization, against onnxruntime fp32.

    python benchmarks/onnxruntime_int8.py accuracy RUN_DIR DATA_DIR
    python benchmarks/onnxruntime_int8.py speed [--batch 1 --batch 32] [--rounds 15] [--only NAME]

`accuracy`: top-1 of each variant of the Fashion-MNIST model (`fashion_mnist.py train`) on the
10,000 test images, static variants calibrated on DATA_DIR/calibration. `speed`: CvT-13 at 224
(random weights, 16 random calibration images), every variant's session and fp32's timed in
alternating rounds in a new random order each round; medians and the per-round ratio to fp32.
The results and the choice (dynamic, what `cvt.engines` builds) are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime import quantization as q

import cvt
from cvt.engines.calibration import load_calibration
from cvt.engines.onnx_graph import onnx_bytes

MM = ["MatMul", "Gemm"]
MMC = ["MatMul", "Gemm", "Conv"]
VARIANTS = {
    # name: (format, per_channel, activation type, op types (None: all))
    "qdq-perchannel-all-s8 (before)": (q.QuantFormat.QDQ, True, q.QuantType.QInt8, None),
    "qdq-pertensor-all-s8": (q.QuantFormat.QDQ, False, q.QuantType.QInt8, None),
    "qdq-perchannel-matmulconv-s8": (q.QuantFormat.QDQ, True, q.QuantType.QInt8, MMC),
    "qdq-perchannel-matmul-s8": (q.QuantFormat.QDQ, True, q.QuantType.QInt8, MM),
    "qdq-perchannel-matmul-u8": (q.QuantFormat.QDQ, True, q.QuantType.QUInt8, MM),
    "qop-perchannel-matmulconv-u8": (q.QuantFormat.QOperator, True, q.QuantType.QUInt8, MMC),
    "qop-perchannel-matmul-u8": (q.QuantFormat.QOperator, True, q.QuantType.QUInt8, MM),
    "qop-perchannel-matmul-s8": (q.QuantFormat.QOperator, True, q.QuantType.QInt8, MM),
    "dynamic-perchannel-matmul": ("dynamic", True, None, MM),  # the engine's int8
}


def quantize(source: Path, target: Path, variant, images: torch.Tensor) -> None:
    """The fp32 graph `source` quantized as `variant` says, static ones calibrated on `images`."""
    fmt, per_channel, act, ops = variant
    if fmt == "dynamic":
        q.quantize_dynamic(str(source), str(target), per_channel=per_channel, op_types_to_quantize=ops,
                           weight_type=q.QuantType.QInt8)
        return

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(images.split(2))

        def get_next(self):
            part = next(self.feeds, None)
            return None if part is None else {"pixel_values": part.numpy()}

    q.quantize_static(str(source), str(target), Reader(), quant_format=fmt, per_channel=per_channel,
                      activation_type=act, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax, op_types_to_quantize=ops)


def session(path: Path) -> ort.InferenceSession:
    """As the engine opens its file: every graph optimisation, torch's thread count."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_all(model, size, images, folder: Path, names) -> dict[str, ort.InferenceSession]:
    """A session of the fp32 graph and of each variant `names` picks (each one's build time on stderr)."""
    source = folder / "fp32.onnx"
    source.write_bytes(onnx_bytes(model, size))
    sessions = {"fp32": session(source)}
    for name in names:
        target = folder / f"{name.split()[0]}.onnx"
        started = time.perf_counter()
        quantize(source, target, VARIANTS[name], images)
        sessions[name] = session(target)
        print(f"built {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return sessions


def accuracy(run_dir: Path, data: Path, names) -> None:
    model = cvt.CvtForImageClassification.from_pretrained(str(run_dir / "best")).eval()
    processor = cvt.CvtImageProcessor.from_pretrained(str(run_dir / "best"))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    calibration = load_calibration(data / "calibration", processor)
    images = torch.cat([x for x, _ in calibration.batches])
    test = load_calibration(data / "test", processor, labels, limit=10_000)
    x = torch.cat([b for b, _ in test.batches])
    y = torch.cat([t for _, t in test.batches])
    with torch.no_grad():
        plain = torch.cat([model(part).logits for part in x.split(500)])
    print(f"plain model top-1 {100 * (plain.argmax(-1) == y).float().mean():.2f} % on {len(y)} images")
    size = tuple(x.shape[-2:])
    with tempfile.TemporaryDirectory() as tmp:
        sessions = build_all(model, size, images, Path(tmp), names)
        for name, s in sessions.items():
            out = torch.cat([torch.from_numpy(s.run(None, {"pixel_values": part.numpy()})[0])
                             for part in x.split(500)])
            top1 = 100 * (out.argmax(-1) == y).float().mean().item()
            agree = 100 * (out.argmax(-1) == plain.argmax(-1)).float().mean().item()
            err = (out - plain).abs().max().item()
            print(f"{name:<36} top-1 {top1:.2f} %  agrees with plain {agree:.2f} %  max|dlogit| {err:.3g}",
                  flush=True)


def speed(batches, rounds: int, names) -> None:
    torch.manual_seed(0)
    model = cvt.CvtForImageClassification(cvt.CvtConfig(depth=(1, 2, 10), num_labels=1000)).eval()
    images = torch.randn(16, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = build_all(model, (224, 224), images, Path(tmp), names)
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224).numpy()
            times = alternate(sessions, x, rounds if batch == 1 else max(3, rounds // 3))
            base = times["fp32"]
            for name, values in times.items():
                ratios = [b / v for b, v in zip(base, values)]
                print(f"batch {batch} {name:<36} median {statistics.median(values):.4f} s  speed-up vs fp32 "
                      f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]", flush=True)


def alternate(sessions, x, rounds):
    """Seconds per call of each session: two warm-up calls each, then rounds in a random order."""
    for s in sessions.values():
        for _ in range(2):
            s.run(None, {"pixel_values": x})
    times = {name: [] for name in sessions}
    order = list(sessions)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            time.sleep(0.05)
            start = time.perf_counter()
            sessions[name].run(None, {"pixel_values": x})
            times[name].append(time.perf_counter() - start)
    return times


def main():
    logging.getLogger().setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["accuracy", "speed"])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", action="append")
    args = parser.parse_args()
    names = [n for n in VARIANTS if not args.only or any(o in n for o in args.only)]
    if args.what == "accuracy":
        accuracy(*args.paths, names)
    else:
        speed(args.batch or [1, 32], args.rounds, names)


if __name__ == "__main__":
    main()
