"""`cvt predict` alone vs `cvt predict --ray` with 1 and 2 workers, on this machine:
`python benchmarks/ray_predict.py [--files 2000] [--model FOLDER] [--json FILE]`.

Each configuration runs in a fresh process over the same folder of generated photographs (JPEG,
640x480, so decoding costs what a camera's thumbnails cost), writing `--format jsonl`. Reported:
- the wall time of the whole command (start-up included: Ray's, the actors' engine builds);
- the steady rate: files per second between the 10th percentile and the last row arriving in
  the output (the temporary file the command names is watched), which is what N nodes multiply;
- the peak RSS of the driver alone and of the driver with every process under it (for --ray
  with a private instance: Ray's GCS, raylet and the actors), sampled every 0.1 s.
The CPU, its core count and the load average before and after are printed: on a shared machine
the numbers are not a benchmark. Without --model, a random-weight CvT-13 (speed does not depend
on the weights) is saved to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from cvt.bench import run_record

CONFIGS = {"alone": [], "ray, 1 worker": ["--ray", "--workers", "1"], "ray, 2 workers": ["--ray", "--workers", "2"]}


def make_photos(folder: Path, count: int) -> None:
    """`count` 640x480 JPEGs: smooth random gradients with noise, so they compress like photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / 640.0
    for i in range(count):
        a, b, c = rng.random((3, 3))
        rgb = np.stack([a[k] * x + b[k] * y + c[k] * x * y for k in range(3)], axis=-1)
        noise = rng.normal(0, 0.05, rgb.shape)
        pixels = np.clip((rgb / max(rgb.max(), 1e-6) + noise) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06}.jpg", quality=90)


def random_model(folder: Path) -> Path:
    import cvt

    cvt.create_model("cvt-13").save_pretrained(folder)
    cvt.CvtImageProcessor.for_model("cvt-13").save_pretrained(folder)
    return folder


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """(RSS of `process`, RSS of it and all its descendants), bytes; 0 for what has gone."""
    own = total = 0
    try:
        own = total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return own, total


def measure(model: str, photos: Path, extra: list[str], workdir: Path, count: int,
            prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> dict:
    """Run one configuration (after `prefix`, such as taskset, with `env` added to the
    environment); its wall time, steady rate and peak memory."""
    output = workdir / f"out-{len(list(workdir.iterdir()))}.jsonl"
    command = [*prefix, sys.executable, "-m", "cvt", "predict", model, str(photos), "--format", "jsonl",
               "--output", str(output), *extra]
    log = output.with_suffix(".log")
    start = time.monotonic()
    with open(log, "w") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        watched, arrivals, peak_own, peak_total = None, [], 0, 0
        while child.poll() is None:
            if watched is None:
                watched = next((Path(m[1]) for m in re.finditer(r"writing to (\S+)", log.read_text())), None)
            lines = _lines(watched)
            if lines and (not arrivals or lines > arrivals[-1][1]):
                arrivals.append((time.monotonic(), lines))
            own, total = tree_rss(psutil.Process(child.pid))
            peak_own, peak_total = max(peak_own, own), max(peak_total, total)
            time.sleep(0.1)
    wall = time.monotonic() - start
    if child.returncode not in (0, 1) or sum(1 for _ in open(output)) != count:
        raise SystemExit(f"{' '.join(command)} failed:\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return {"wall_s": wall, "steady_files_per_s": steady_rate(arrivals, count),
            "peak_rss_driver_mb": peak_own / 2**20, "peak_rss_all_mb": peak_total / 2**20}


def _lines(path: Path | None) -> int:
    try:
        return path.read_bytes().count(b"\n") if path else 0
    except FileNotFoundError:
        return 0


def steady_rate(arrivals: list[tuple[float, int]], count: int) -> float | None:
    """Files per second from the first sample past 10 % of the files to the last sample."""
    later = [(t, n) for t, n in arrivals if n >= count / 10]
    if len(later) < 2 or later[-1][0] == later[0][0]:
        return None
    return (later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="photos to classify (default 2000)")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a random-weight CvT-13)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvt-ray-bench-") as tmp:
        work = Path(tmp)
        model = args.model or str(random_model(work / "model"))
        make_photos(work / "photos", args.files)
        (work / "out").mkdir()
        subprocess.run([sys.executable, "-m", "cvt", "predict", model, str(work / "photos" / "000000.jpg")],
                       check=True, capture_output=True)  # builds and caches the engine once
        load_before = os.getloadavg()
        results = {name: measure(model, work / "photos", extra, work / "out", args.files)
                   for name, extra in CONFIGS.items()}
    machine = {**run_record(), "cores": os.cpu_count(), "load_before": load_before,
               "load_after": os.getloadavg(), "files": args.files}
    print(f"{machine['cpu']}, {machine['cores']} cores; load average before "
          f"{load_before[0]:.2f}, after {machine['load_after'][0]:.2f}; {args.files} files")
    print(f"| {'configuration':<15} | wall s | steady files/s | peak RSS driver MB | peak RSS all MB |")
    print(f"|{'-' * 17}|--------|----------------|--------------------|-----------------|")
    for name, r in results.items():
        rate = f"{r['steady_files_per_s']:.1f}" if r["steady_files_per_s"] else "n/a"
        print(f"| {name:<15} | {r['wall_s']:6.1f} | {rate:>14} | {r['peak_rss_driver_mb']:18.0f} | "
              f"{r['peak_rss_all_mb']:15.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
