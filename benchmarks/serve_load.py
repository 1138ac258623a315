"""`cvt serve` under load, one replica without batching (--max-batch-size 1) against batching on:
`python benchmarks/serve_load.py [--clients 16] [--photos 50] [--model FOLDER] [--json FILE]`.

Each configuration is a fresh `cvt serve` (a private Ray instance) on 127.0.0.1. `--clients`
threads each send `--photos` of scikit-image's photographs (JPEG, one after another, on one
keep-alive connection) to POST /predict; the run is bounded by that count and by --time-limit.
Reported per configuration: throughput (answers per second, first request sent to last answer),
the steady rate (answers per second from the tenth percentile of answers to the last, as
`ray_predict.py` measures `cvt predict`), p50 and p99 latency, and the mean batch size the replica
formed (from /info's counters, read before and after the load). The replica gets
`--cpus-per-replica` CPUs (default: the machine's cores, as a `cvt predict` process has them).
The same photographs, as files, also go through `cvt predict` with the engine the service used
(its steady files per second). The batching service and `cvt predict` alternate for `--rounds`
rounds, so that a machine whose speed drifts moves both sides of a round alike; each round's
ratio of steady rates is printed, and their median.
Every answer must be a 200 equal to `cvt.pipeline` on the same photo (labels equal, scores
within 1e-5); the script exits 1 otherwise. The CPU, its core count and the
load average before and after are printed: on a shared machine the numbers are not a benchmark.
Without --model, a random-weight CvT-13 (speed does not depend on the weights) is saved to a
temporary folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from cvt.bench import cpu_name, run_record
from ray_predict import measure as measure_predict, steady_rate

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "hubble_deep_field",
          "immunohistochemistry", "page", "moon", "retina", "grass", "brick", "cat")
SCORE_TOLERANCE = 1e-5


def write_photos(folder: Path) -> list[Path]:
    """scikit-image's photographs as RGB JPEGs (quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(paths[-1], quality=90)
    return paths


def random_model(folder: Path) -> Path:
    import cvt

    cvt.create_model("cvt-13").save_pretrained(folder)
    cvt.CvtImageProcessor.for_model("cvt-13").save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


def start_service(model: str, options: list[str], log: Path, timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "cvt", "serve", model, "--port", str(port), *options],
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"cvt serve exited: {log.read_text()[-3000:]}")
        try:
            get_json(f"{url}/health")
            return process, url
        except OSError:
            time.sleep(0.5)
    stop_service(process)
    sys.exit(f"cvt serve was not healthy after {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def stop_service(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def client(port: int, bodies: list[tuple[int, bytes]], deadline: float, results: list) -> None:
    """Send (photo index, JPEG) one after another on one connection, until done or `deadline`;
    append (photo index, status, latency s, answer) for each."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for index, body in bodies:
            if time.monotonic() > deadline:
                return
            began = time.perf_counter()
            connection.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
            answer = connection.getresponse()
            content = answer.read()
            results.append((index, answer.status, time.perf_counter() - began, content, time.perf_counter()))
    finally:
        connection.close()


def load(url: str, photos: list[bytes], clients: int, per_client: int, time_limit_s: float) -> tuple[list, float]:
    """Every client's results, and the seconds from the first request to the last answer."""
    port, results = int(url.rsplit(":", 1)[1]), []
    deadline = time.monotonic() + time_limit_s
    plans = [[((c + i) % len(photos), photos[(c + i) % len(photos)]) for i in range(per_client)]
             for c in range(clients)]
    threads = [threading.Thread(target=client, args=(port, plan, deadline, results)) for plan in plans]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(time_limit_s + 130)
    return results, time.perf_counter() - began


def answers_steady_rate(results: list) -> float:
    """Answers per second as `cvt predict`'s steady rate is measured, each answer an arrival (NaN:
    too few answers to see one)."""
    finished = sorted(result[4] for result in results)
    return steady_rate([(t, n) for n, t in enumerate(finished, 1)], len(finished)) or float("nan")


def mean_batch(before: dict, after: dict) -> float:
    """The mean size of the batches formed between two /info answers."""
    def counts(info: dict) -> dict[int, int]:
        return {int(size): count for size, count in info["batch_sizes"].items()}

    first, last = counts(before), counts(after)
    formed = {size: last[size] - first.get(size, 0) for size in last}
    batches = sum(formed.values())
    return sum(size * n for size, n in formed.items()) / batches if batches else float("nan")


def mismatches(results: list, expected: list[list[dict]], expected_count: int) -> list[str]:
    """Why the answers are not all 200s equal to the pipeline's (empty when they are)."""
    problems = [] if len(results) == expected_count else [f"{len(results)} answers of {expected_count}"]
    for index, status, _, content, _ in results:
        if status != 200:
            problems.append(f"{PHOTOS[index]}: status {status}: {content[:200]!r}")
            continue
        got, want = json.loads(content), expected[index]
        if [p["label"] for p in got] != [p["label"] for p in want] or not np.allclose(
                [p["score"] for p in got], [p["score"] for p in want], rtol=0, atol=SCORE_TOLERANCE):
            problems.append(f"{PHOTOS[index]}: {got} != {want}")
    return problems


def measure(model: str, options: list[str], photos: list[bytes], expected: list, args, log: Path) -> dict:
    process, url = start_service(model, options + ["--engine", args.engine], log, args.start_timeout)
    try:
        get_json(f"{url}/info")
        client(int(url.rsplit(":", 1)[1]), [(0, photos[0])], time.monotonic() + 60, [])  # warm up
        before = get_json(f"{url}/info")
        results, seconds = load(url, photos, args.clients, args.photos, args.time_limit)
        after = get_json(f"{url}/info")
    finally:
        stop_service(process)
    latencies = np.array([result[2] for result in results]) * 1000
    problems = mismatches(results, expected, args.clients * args.photos)
    return {"options": " ".join(options), "requests": len(results),
            "ok": sum(result[1] == 200 for result in results),
            "throughput_per_s": len(results) / seconds, "steady_per_s": answers_steady_rate(results),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "mean_batch_size": mean_batch(before, after),
            "engine": after["engine"], "equal_to_pipeline": not problems, "problems": problems[:10]}


def predict_rate(model: str, photos: list[Path], engine: str, args, tmp: Path) -> dict:
    """`cvt predict` (one process, `engine`) on the photographs the clients sent, as files in the
    same order: its wall time and steady files per second."""
    folder, work = tmp / "sent", tmp / "predict"
    folder.mkdir(parents=True)
    work.mkdir()
    for c in range(args.clients):
        for i in range(args.photos):
            shutil.copyfile(photos[(c + i) % len(photos)], folder / f"{c:02}-{i:04}.jpg")
    return measure_predict(model, folder, ["--engine", engine], work, args.clients * args.photos)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--photos", type=int, default=50, help="photos each client sends")
    parser.add_argument("--model", help="checkpoint folder (default: a random-weight CvT-13)")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16, help="with batching on (default: 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--cpus-per-replica", type=int, default=os.cpu_count(),
                        help="the replica's CPUs and engine threads (default: the machine's cores)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batching service and cvt predict")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds of load per configuration")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.photos <= 1000 and 1 <= args.rounds <= 9):
        parser.error("--clients 1-64, --photos 1-1000 and --rounds 1-9 (the load is bounded)")
    import cvt

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_model(Path(tmp) / "cvt-13"))
        paths = write_photos(Path(tmp) / "photos")
        reference = cvt.pipeline("image-classification", model, engine=args.engine)  # fp32
        expected = [reference(str(path)) for path in paths]
        photos = [path.read_bytes() for path in paths]
        cpus = ["--cpus-per-replica", str(args.cpus_per_replica)]
        batching = ["--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms), *cpus]
        unbatched = measure(model, ["--max-batch-size", "1", *cpus], photos, expected, args, Path(tmp) / "serve.log")
        rounds = []
        for i in range(args.rounds):  # alternating, so that a drifting machine moves both sides alike
            service = measure(model, batching, photos, expected, args, Path(tmp) / f"serve-{i}.log")
            predict = predict_rate(model, paths, service["engine"], args, Path(tmp) / f"round-{i}")
            predict["steady_files_per_s"] = predict["steady_files_per_s"] or float("nan")  # None: too few files
            rounds.append({"batching": service, "cvt predict": predict,
                           "ratio": service["steady_per_s"] / predict["steady_files_per_s"]})
    print(f"load average after: {os.getloadavg()}")
    median = float(np.median([r["ratio"] for r in rounds]))
    report(args, unbatched, rounds, median)
    if args.json:
        Path(args.json).write_text(json.dumps({**run_record(), "cores": os.cpu_count(), "no batching": unbatched,
                                               "rounds": rounds, "median batching / cvt predict": median},
                                              indent=2) + "\n")
    return 0 if all(r["equal_to_pipeline"] for r in [unbatched, *(r["batching"] for r in rounds)]) else 1


def report(args, unbatched: dict, rounds: list[dict], median: float) -> None:
    print(f"{args.clients} clients x {args.photos} photos, 1 replica, engine {unbatched['engine']}")
    print(f"{'':14} {'answers/s':>10} {'steady/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'200s':>9}"
          f"  equal to pipeline  {'cvt predict/s':>13}  ratio")
    rows = [("no batching", unbatched, None)] + [(f"batching, {i + 1}", r["batching"], r) for i, r in enumerate(rounds)]
    for name, r, round_ in rows:
        against = (f"  {round_['cvt predict']['steady_files_per_s']:13.2f}  {round_['ratio']:.2f}x" if round_ else "")
        print(f"{name:14} {r['throughput_per_s']:10.2f} {r['steady_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['mean_batch_size']:10.2f} {r['ok']:4}/{args.clients * args.photos:<4}  "
              f"{str(r['equal_to_pipeline']):17}{against}")
        for problem in r["problems"]:
            print(f"  {problem}")
    print(f"batching service / cvt predict (steady rates), median of {len(rounds)} rounds: {median:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
