"""What `cvt predict --ray` gives, as ratios measured in one run on one machine:
`python benchmarks/ray_scaling.py [--files 2000] [--engine torch] [--model FOLDER] [--json FILE]`.

Two comparisons, each over the same folder of generated photographs with the same engine:
- one machine: `cvt predict --ray` (a private instance: one actor with all the CPUs and as many
  engine threads) against `cvt predict` in one process;
- scaling: a cluster of two Ray nodes of one CPU each, started here with `ray start` (node i
  pinned to core i with `taskset` when the machine has two cores), against a one-thread
  `cvt predict` pinned to core 0 (`taskset -c 0`, OMP_NUM_THREADS=1).
The rate is the steady one of `ray_predict.py` (files per second from 10 % of the files to the
last row); the wall time includes start-up. The cluster run must have results from both nodes
and the one-thread run's labels for every file, or the script fails: a ratio from one node, or
from other work, would mislead. Run it alone on the machine: anything else running moves the
numbers. `--files 200` makes a quick check that it works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cvt.bench import run_record
from ray_predict import make_photos, measure, random_model

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MIN_FILES = 16  # two of `cvt predict`'s batches of 8: one for each node
RUNS = ("alone", "ray, one machine", "one thread (taskset)", "ray, two 1-CPU nodes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def two_one_cpu_nodes(env: dict[str, str]) -> Iterator[str]:
    """A head and a second node of one CPU each on 127.0.0.1 (`ray start --block`, so ending that
    process stops exactly that node), each pinned to a core of its own when there are two;
    yields HOST:PORT, and stops the two processes it started."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="cvt-ray-scaling-")
    address, nodes = f"127.0.0.1:{port}", []
    cores = sorted(os.sched_getaffinity(0))
    try:
        for i in range(2):
            where = (["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp,
                      "--ray-client-server-port", str(_free_port())] if i == 0 else ["--address", address])
            pin = ["taskset", "-c", str(cores[i])] if len(cores) >= 2 and shutil.which("taskset") else []
            log = open(Path(temp) / f"node-{i}.log", "w+")
            node = subprocess.Popen([*pin, "ray", "start", *where, "--block", "--num-cpus", "1",
                                     "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                                     "--dashboard-agent-listen-port", "0"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp)
            nodes.append((node, log))
            _wait_started(Path(log.name), node)
        yield address
    finally:
        for node, log in reversed(nodes):
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
            log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_started(log: Path, node: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"a Ray node did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def _ratio(a: dict, b: dict) -> float | None:
    """a's steady rate over b's (None when a run was too short to have one)."""
    ra, rb = a["steady_files_per_s"], b["steady_files_per_s"]
    return ra / rb if ra and rb else None


def run_all(model: str, photos: Path, out: Path, files: int, engine: str) -> dict[str, dict]:
    """The four runs, in a fixed order, each in a fresh process writing into a folder of its own
    under `out`; the cluster run checked against the one-thread run (`check_cluster_run`)."""
    base = ["--engine", engine]
    taskset = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    folders = {name: out / name.replace(" ", "-").replace(",", "") for name in RUNS}
    for folder in folders.values():
        folder.mkdir()
    results = {"alone": measure(model, photos, base, folders["alone"], files),
               "ray, one machine": measure(model, photos, [*base, "--ray"], folders["ray, one machine"], files),
               "one thread (taskset)": measure(model, photos, base, folders["one thread (taskset)"], files,
                                               prefix=taskset, env=ONE_THREAD)}
    # the cluster's own token (Ray's token authentication), given to its nodes and its driver
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    # the first batch waits for both nodes' actors (Ray Data's setting), so that both nodes work
    # from the start: else, on a busy machine, the node whose actor started first may take every file
    both_ready = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}
    cluster = folders["ray, two 1-CPU nodes"]
    with two_one_cpu_nodes({**os.environ, **token}) as address:
        results["ray, two 1-CPU nodes"] = measure(model, photos, [*base, "--ray", address], cluster, files,
                                                  env={**token, **both_ready})
    print(check_cluster_run(cluster, folders["one thread (taskset)"]))
    return results


def check_cluster_run(cluster: Path, single: Path) -> str:
    """What the cluster run's folder shows against the one-thread run's (each one output,
    out-0.jsonl, and its log): results from both nodes, and the same labels and errors for every
    file. A SystemExit otherwise."""
    log = (cluster / "out-0.log").read_text()
    nodes = set(re.findall(r"ray: node ([0-9a-f]+): first results", log))
    if len(nodes) != 2:
        raise SystemExit(f"the two-node run had results from {len(nodes)} node(s), not 2:\n{log[-2000:]}")
    got, want = (_labels(folder / "out-0.jsonl") for folder in (cluster, single))
    differ = sorted(path for path in want.keys() | got.keys() if got.get(path) != want.get(path))
    if differ:
        raise SystemExit(f"the two-node run's labels differ from the one-thread run's for {len(differ)} "
                         f"files, such as {differ[0]}")
    return f"two 1-CPU nodes: results from both nodes, the one-thread run's labels for all {len(want)} files"


def _labels(output: Path) -> dict[str, tuple]:
    """Each file's (labels, error) in a jsonl output."""
    with open(output, encoding="utf-8") as f:
        return {row["path"]: (row["labels"], row["error"]) for row in map(json.loads, f)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="photos to classify (default 2000)")
    parser.add_argument("--engine", default="torch", help="the engine every run uses (default torch)")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a random-weight CvT-13)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.files < MIN_FILES:
        parser.error(f"--files must be at least {MIN_FILES}: two batches, one for each node")
    with tempfile.TemporaryDirectory(prefix="cvt-ray-scaling-") as tmp:
        work = Path(tmp)
        model = args.model or str(random_model(work / "model"))
        make_photos(work / "photos", args.files)
        (work / "out").mkdir()
        subprocess.run([sys.executable, "-m", "cvt", "predict", model, str(work / "photos" / "000000.jpg"),
                        "--engine", args.engine], check=True, capture_output=True)  # the engine built once
        load_before = os.getloadavg()
        results = run_all(model, work / "photos", work / "out", args.files, args.engine)
    ratios = {"ray on one machine / cvt predict": _ratio(results["ray, one machine"], results["alone"]),
              "two 1-CPU nodes / one thread": _ratio(results["ray, two 1-CPU nodes"],
                                                     results["one thread (taskset)"])}
    record = run_record()  # the CPU, date and commit every results file names
    machine = {"cpu": record["cpu"], "cores": len(os.sched_getaffinity(0)), "load_before": load_before,
               "load_after": os.getloadavg()}
    meta = {"cpu": record["cpu"], "date": record["date"], "commit": record["commit"], "files": args.files,
            "engine": args.engine, "machine": machine}
    print(f"{machine['cpu']}, {machine['cores']} cores; {meta['date']}, commit {meta['commit']}; "
          f"{args.files} files, engine {args.engine}; load average before {load_before[0]:.2f}, "
          f"after {machine['load_after'][0]:.2f}")
    print(f"| {'run':<22} | wall s | images/s |")
    print(f"|{'-' * 24}|--------|----------|")
    for name, r in results.items():
        rate = f"{r['steady_files_per_s']:.1f}" if r["steady_files_per_s"] else "n/a"
        print(f"| {name:<22} | {r['wall_s']:6.1f} | {rate:>8} |")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x" if value else f"{name}: n/a (too few files for a steady rate)")
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "results": results, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
