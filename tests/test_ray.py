"""Predictions that stream to disk, and `cvt predict --ray`: the same rows as a single process (for
good, broken and hostile files), on a private Ray instance and on two nodes started with
`ray start`, with every file exactly once even when an actor is killed mid-run; a `kill -9` leaves
only whole lines; memory does not grow with the folder."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
from PIL import Image
from skimage import data as skimage_data

import cvt
from cvt.cli import main
from conftest import RAY_TESTS, as_at_a_terminal, save_tiny_classifier

# one worker runs the tests that start Ray (these, test_serve's, the scaling smoke's): they mostly
# wait on Ray's processes, and the other workers compute meanwhile
pytestmark = RAY_TESTS

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "hubble_deep_field",
                  "immunohistochemistry", "page", "moon", "retina", "grass", "brick", "cat")
ROW_KEYS = ["path", "labels", "scores", "error"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint, its onnxruntime and torch engines built (and cached) before the runs."""
    folder = save_tiny_classifier(tmp_path_factory.mktemp("model"))
    for engine in ("onnxruntime", "torch"):
        cvt.pipeline("image-classification", str(folder), engine=engine)
    return folder


def make_folder(root: Path, generated: int) -> Path:
    """`generated` random images (JPEG, PNG, grey, RGBA, odd sizes), scikit-image's photographs,
    and broken or hostile files: truncated JPEG, text named .jpg, empty file, a PNG cut after its
    header, a FIFO, a dangling link, a file that cannot be read."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(generated):
        h, w = 16 + (i * 7) % 90, 16 + (i * 13) % 90
        shape = [(h, w, 3), (h, w), (h, w, 4)][i % 3]
        sub = root / f"part{i % 4}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(sub / f"gen{i:05}.{'jpg' if i % 3 == 0 else 'png'}")
    for name in SKIMAGE_PHOTOS:
        Image.fromarray(getattr(skimage_data, name)()).save(root / f"{name}.jpg")
    jpeg = (root / "chelsea.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "text.jpg").write_text("not a JPEG, just text\n")
    (root / "empty.jpg").write_bytes(b"")
    png = (root / "part1" / "gen00001.png").read_bytes()
    (root / "cut.png").write_bytes(png[:40])
    os.mkfifo(root / "fifo.jpg")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "locked.png").write_bytes(png)
    (root / "locked.png").chmod(0)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("photos") / "photos", 180)


def cvt_command(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cvt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_at_a_terminal, **popen)


def run_cvt(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvt", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_path(rows: list[dict]) -> dict[str, dict]:
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "a file appears more than once"
    return {row["path"]: row for row in rows}


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same files, same errors, same labels, scores within 1e-5 relative."""
    got, want = by_path(got), by_path(want)
    assert sorted(got) == sorted(want)
    for path, row in want.items():
        assert list(got[path]) == ROW_KEYS
        assert (got[path]["error"], got[path]["labels"]) == (row["error"], row["labels"]), path
        if row["scores"] is not None:
            assert np.allclose(got[path]["scores"], row["scores"], rtol=1e-5, atol=0), path


@pytest.fixture(scope="module")
def plain_rows(model_dir, folder, tmp_path_factory) -> dict[str, list[dict]]:
    """`cvt predict --format jsonl` in one process, for each engine: the reference rows."""
    rows = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path_factory.mktemp("plain") / "plain.jsonl"
        assert main(["predict", str(model_dir), str(folder), "--format", "jsonl", "--output", str(out),
                     "--engine", engine]) == 1  # some files failed
        rows[engine] = read_jsonl(out)
    return rows


def test_streaming_formats_hold_the_same_results(model_dir, folder, plain_rows, tmp_path, capsys) -> None:
    """jsonl (named temporary file, renamed at the end), csv and parquet rows agree with each
    other and with json; each failed file is there once with its reason."""
    import pyarrow.parquet as pq

    rows = by_path(plain_rows["onnxruntime"])
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    assert len(rows) == len(files) and {r["path"] for r in rows.values()} == {str(p) for p in files}
    failed = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert set(failed) == {"truncated.jpg", "text.jpg", "empty.jpg", "cut.png", "fifo.jpg",
                           "dangling.jpg", "locked.png"} - ({"locked.png"} if os.geteuid() == 0 else set())
    assert "truncated" in failed["truncated.jpg"] and "FIFO" in failed["fifo.jpg"]
    for fmt in ("csv", "parquet", "json"):
        out = tmp_path / f"out.{fmt}"
        capsys.readouterr()
        assert main(["predict", str(model_dir), str(folder), "--format", fmt, "--output", str(out),
                     "--engine", "onnxruntime"]) == 1
        assert ("cvt: writing to " in capsys.readouterr().err) == (fmt != "json")
        if fmt == "parquet":
            assert_same_rows(pq.read_table(out).to_pylist(), list(rows.values()))
        elif fmt == "json":
            for entry in json.loads(out.read_text()):
                row = rows[entry["path"]]
                assert entry.get("error") == row["error"]
                assert [p["label"] for p in entry.get("predictions", [])] == (row["labels"] or [])
        else:
            table = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
            assert list(table[0]) == ["path", "rank", "label", "score", "error"]
            for line in table:
                row = rows[line["path"]]
                if row["labels"] is None:
                    assert (line["rank"], line["error"]) == ("", row["error"])
                else:
                    k = int(line["rank"]) - 1
                    assert line["label"] == row["labels"][k]
                    assert math.isclose(float(line["score"]), row["scores"][k], rel_tol=1e-12)
    assert list(tmp_path.glob(".*.tmp")) == []  # every temporary file renamed


def test_parquet_needs_an_output_file_and_workers_need_ray(model_dir, folder, capsys) -> None:
    for args, message in [(["--format", "parquet"], "--output"), (["--workers", "2"], "--ray"),
                          (["--ray", "nowhere/"], "HOST:PORT"), (["--ray", "--workers", "0"], "positive")]:
        assert main(["predict", str(model_dir), str(folder), *args]) == 2
        assert message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.subprocess
def test_kill_9_halfway_leaves_whole_lines_and_the_earlier_output(model_dir, tmp_path) -> None:
    """A single-process jsonl run killed with SIGKILL: the temporary file it named holds whole
    rows only, and the --output file of an earlier run is untouched."""
    photos = make_folder(tmp_path / "many", 1500)
    out = tmp_path / "out.jsonl"
    out.write_text('{"earlier": "run"}\n')
    child = cvt_command("predict", str(model_dir), str(photos), "--format", "jsonl", "--output",
                        str(out), "--batch-size", "4", "--engine", "onnxruntime")
    tmp = Path(next(m[1] for line in child.stderr if (m := re.search(r"cvt: writing to (\S+)", line))))
    while child.poll() is None and _count_lines(tmp) < 200:
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run finished before it was killed: give it more files"
    lines = tmp.read_text(encoding="utf-8").splitlines()
    assert 200 <= len(lines) < 1500 + 17 and tmp.read_text(encoding="utf-8").endswith("\n")
    assert all(list(json.loads(line)) == ROW_KEYS for line in lines)
    assert out.read_text() == '{"earlier": "run"}\n'


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_memory_does_not_grow_with_the_folder(model_dir, tmp_path) -> None:
    """Peak RSS of a jsonl run over 5,000 small files stays within 30 MB of a 500-file run's: the
    results go to disk as they come (images held would cost 49 kB each, 245 MB here)."""
    peaks = {}
    for count in (500, 5000):
        folder = tmp_path / f"n{count}"
        folder.mkdir()
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
        for i in range(count):
            image.save(folder / f"{i:05}.png")
        measure = ("import resource, sys; from cvt.cli import main; status = main(sys.argv[1:]); "
                   "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
                   "sys.exit(status)")
        done = subprocess.run([sys.executable, "-c", measure, "predict", str(model_dir), str(folder),
                               "--format", "jsonl", "--output", str(tmp_path / f"{count}.jsonl"),
                               "--engine", "onnxruntime"], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        assert len(read_jsonl(tmp_path / f"{count}.jsonl")) == count
        peaks[count] = int(re.search(r"peak (\d+)", done.stderr)[1]) / 1024  # MB
    assert peaks[5000] - peaks[500] < 30, peaks


# Ray: each test below starts Ray (a private instance, or a cluster of its own with `ray start`)


def ray_env(token: str) -> dict[str, str]:
    """This environment with token authentication on, with the test's own token."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_cluster(cpus_per_node: list[int], env: dict[str, str]) -> Iterator[str]:
    """A head and worker nodes on this machine, each `ray start --block` (so that ending that
    process stops exactly this node), in a temporary folder of their own, which is also their
    working directory; yields HOST:PORT."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="cvt-ray-", dir="/tmp")
    address, nodes = f"127.0.0.1:{port}", []
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--dashboard-agent-listen-port", "0"]
    try:
        for i, cpus in enumerate(cpus_per_node):
            where = (["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp,
                      "--ray-client-server-port", str(free_port())] if i == 0 else ["--address", address])
            log = open(Path(temp) / f"start-{i}.log", "w+")
            nodes.append((subprocess.Popen(["ray", "start", *where, *common, "--num-cpus", str(cpus)],
                                           stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp), log))
            _wait_for(log, nodes[-1][0])
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


def _wait_for(log, node: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in Path(log.name).read_text():
        assert node.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_ray_with_two_workers_gives_the_same_rows(model_dir, folder, plain_rows, tmp_path, engine) -> None:
    out = tmp_path / "ray.jsonl"
    done = run_cvt("predict", str(model_dir), str(folder), "--format", "jsonl", "--output", str(out),
                   "--engine", engine, "--ray", "--workers", "2", "--batch-size", "8",
                   env=ray_env(secrets.token_hex(16)))
    assert done.returncode == 1, done.stderr
    assert_same_rows(read_jsonl(out), plain_rows[engine])
    assert re.search(r"cvt: ray: \d+ files on 2 actors", done.stderr)
    assert done.stdout.startswith("wrote jsonl results for ")  # no log of Ray's on stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_an_actor_killed_mid_run_loses_and_repeats_no_file(model_dir, tmp_path) -> None:
    """SIGKILL to one of the two actors' processes while results stream in: Ray restarts it and
    retries its batch, and every file is in the output exactly once."""
    photos = make_folder(tmp_path / "many", 800)
    env = {**ray_env(secrets.token_hex(16)), "CVT_TEST_CLUSTER": secrets.token_hex(8)}
    out = tmp_path / "out.jsonl"
    with ray_cluster([2], env) as address:
        child, tmp = predict_until_rows_flow(model_dir, photos, out, address, env, rows=50)
        victim = _an_actor_of(env["CVT_TEST_CLUSTER"])
        victim.kill()
        assert child.poll() is None and _count_lines(tmp) < 800, "the run ended before the kill"
        _, stderr = child.communicate(timeout=600)
    assert child.returncode == 1, stderr
    rows = by_path(read_jsonl(out))
    assert sorted(rows) == sorted(str(p) for p in photos.rglob("*") if not p.is_dir())


def predict_until_rows_flow(model_dir: Path, photos: Path, out: Path, address: str, env: dict[str, str],
                            rows: int) -> tuple[subprocess.Popen, Path]:
    """`cvt predict --ray` on two actors, once `rows` rows are in its temporary output file
    (or it ended); (the process, that file)."""
    child = cvt_command("predict", str(model_dir), str(photos), "--format", "jsonl", "--output", str(out),
                        "--engine", "onnxruntime", "--ray", address, "--workers", "2", "--batch-size", "2", env=env)
    tmp = out.parent / "never"
    while child.poll() is None and _count_lines(tmp) < rows:
        tmp = next(out.parent.glob(f".{out.name}.*.tmp"), tmp)
        time.sleep(0.05)
    return child, tmp


def _an_actor_of(cluster: str) -> psutil.Process:
    """A process of this test's cluster that runs a CvtPredictor actor."""
    return _a_process_of(cluster, "CvtPredictor")


def _a_process_of(cluster: str, name: str) -> psutil.Process:
    """A process of this test's cluster with `name` in its command line."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if (name in " ".join(process.info["cmdline"] or [])
                    and process.environ().get("CVT_TEST_CLUSTER") == cluster):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no {name} process found")


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_stops_the_driver_and_its_ray_instance_and_keeps_the_rows(model_dir, tmp_path) -> None:
    photos = make_folder(tmp_path / "many", 600)
    out = tmp_path / "out.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "cvt", "predict", str(model_dir), str(photos), "--format",
                              "jsonl", "--output", str(out), "--engine", "onnxruntime", "--ray", "--workers",
                              "2", "--batch-size", "2"], stderr=subprocess.PIPE, text=True,
                             env=ray_env(secrets.token_hex(16)), preexec_fn=as_at_a_terminal)
    tmp = Path(next(m[1] for line in child.stderr if (m := re.search(r"cvt: writing to (\S+)", line))))
    while child.poll() is None and _count_lines(tmp) < 20:
        time.sleep(0.05)
    processes = psutil.Process(child.pid).children(recursive=True)  # Ray's GCS, raylet, actors, ...
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 130, stderr
    rows = read_jsonl(out)
    assert 20 <= len(rows) < 600 and "cvt: interrupted after" in stderr
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], [p.pid for p in alive]


IMAGE_COLUMN = """
import json, sys
import numpy as np
import ray
import cvt
from cvt.ray import CvtPredictor

model = sys.argv[1]
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 30, 3), (64, 64, 3), (17, 90, 3)]]
images += [np.zeros((5, 7, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)]  # 2 channels; empty
ray.init(address="local", include_dashboard=False)
dataset = ray.data.from_items([{"image": image, "path": f"a{i}"} for i, image in enumerate(images)])
rows = dataset.map_batches(CvtPredictor, fn_constructor_args=(model,), fn_constructor_kwargs={"top_k": 3},
                           batch_size=8, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
want = cvt.pipeline("image-classification", model, top_k=3)(images[:3])
print(json.dumps({"rows": sorted(rows, key=lambda r: r["path"]), "want": want}, default=list))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_an_image_column_as_read_images_gives_it(model_dir) -> None:
    """Arrays in an `image` column: the pipeline's top-k for each good one, an error row for
    each unusable one (two channels, no pixels), and the `path` column passed through."""
    done = subprocess.run([sys.executable, "-c", IMAGE_COLUMN, str(model_dir)], capture_output=True, text=True,
                          env=ray_env(secrets.token_hex(16)), timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows, want = result["rows"], result["want"]
    assert [row["path"] for row in rows] == ["a0", "a1", "a2", "a3", "a4"]
    for row, top in zip(rows, want):
        assert row["error"] is None and row["labels"] == [p["label"] for p in top]
        assert np.allclose(row["scores"], [p["score"] for p in top], rtol=1e-5, atol=0)
    assert "2 or 3 dimensions" not in rows[3]["error"] and "C = 1, 3 or 4" in rows[3]["error"]
    assert "empty" in rows[4]["error"] and rows[3]["labels"] is None and rows[4]["scores"] is None
    assert len({row["node"] for row in rows}) == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_relative_paths_and_names_that_are_not_utf8_on_a_cluster(model_dir, tmp_path, monkeypatch) -> None:
    """Run from a working directory the cluster's nodes do not share, with a relative model
    folder and image folder: the rows equal a single process's, each path as given, a file
    name with byte 0xE9 included (a good image and a broken one); --workers beyond the
    cluster's CPUs logs the actors that run."""
    photos = make_folder(tmp_path / "here" / "photos", 12)
    named = os.fsdecode(b"caf\xe9")
    (photos / f"{named}.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    (photos / f"{named}-text.jpg").write_text("not an image")
    shutil.copytree(model_dir, tmp_path / "here" / "model")
    args = ["predict", "model", "photos", "--format", "jsonl", "--engine", "onnxruntime", "--output"]
    env = ray_env(secrets.token_hex(16))
    monkeypatch.chdir(tmp_path / "here")
    assert main([*args, "single.jsonl"]) == 1  # in one process, from here
    with ray_cluster([2], env) as address:
        done = subprocess.run([sys.executable, "-m", "cvt", *args, "ray.jsonl", "--ray", address,
                               "--workers", "64"], capture_output=True, cwd=tmp_path / "here", env=env,
                              timeout=600)
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 1, stderr
    rows, want = read_jsonl(tmp_path / "here" / "ray.jsonl"), read_jsonl(tmp_path / "here" / "single.jsonl")
    assert_same_rows(rows, want)
    got = by_path(rows)
    assert got[f"photos/{named}.jpg"]["error"] is None and got[f"photos/{named}-text.jpg"]["error"]
    actors = int(re.search(r"cvt: ray: \d+ files on (\d+) actors", stderr)[1])
    assert actors < 64 and f"--workers 64, but the cluster has {actors} CPUs" in stderr


def interrupted_run(model_dir: Path, tmp_path: Path, sig: int, after_rows: int) -> tuple[subprocess.Popen, str]:
    """A `--ray` jsonl run of 621 files sent `sig` once `after_rows` rows are in its temporary
    file (0: once its actors are asked for, before any result); returns it ended, and its stderr."""
    photos = make_folder(tmp_path / "many", 600)
    child = cvt_command("predict", str(model_dir), str(photos), "--format", "jsonl", "--output",
                        str(tmp_path / "out.jsonl"), "--engine", "onnxruntime", "--ray", "--workers", "2",
                        "--batch-size", "2", env=ray_env(secrets.token_hex(16)))
    marker = "cvt: writing to " if after_rows else "cvt: ray: "
    seen = next((line for line in child.stderr if marker in line), "")
    tmp = Path(re.search(r"cvt: writing to (\S+)", seen)[1]) if after_rows else tmp_path / "never"
    while child.poll() is None and _count_lines(tmp) < after_rows:
        time.sleep(0.05)
    assert child.poll() is None and _count_lines(tmp) < 621, "the run ended before the signal"
    processes = psutil.Process(child.pid).children(recursive=True)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=60)
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]
    return child, seen + stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_once_rows_flow_keeps_a_valid_prefix(model_dir, tmp_path) -> None:
    """SIGTERM under --ray ends the run as without Ray: exit status 130, the rows finished so
    far written to --output as whole rows (Ray's own handler would exit 15 and lose them)."""
    child, stderr = interrupted_run(model_dir, tmp_path, signal.SIGTERM, after_rows=20)
    assert child.returncode == 130, stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert 20 <= len(rows) < 621 and all(list(row) == ROW_KEYS for row in rows)
    assert f"cvt: interrupted after {len(rows)} of 621 files" in stderr  # make_folder adds 21


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_before_the_first_results(model_dir, tmp_path) -> None:
    """Ctrl-C while the actors start (no result yet) ends the run at once, exit status 130,
    with Ray's processes."""
    started = time.monotonic()
    child, stderr = interrupted_run(model_dir, tmp_path, signal.SIGINT, after_rows=0)
    assert child.returncode == 130, stderr
    assert "first results" not in stderr and "cvt: interrupted" in stderr
    assert time.monotonic() - started < 300


@pytest.mark.parametrize("moment", ["as the actors are asked for", "before the first row is written"])
def test_a_ctrl_c_at_any_moment_after_ray_started_ends_the_private_instance(moment, tmp_path, monkeypatch,
                                                                             capsys) -> None:
    """The gaps between start-up steps, where a Ctrl-C on a busy machine once left Ray's agents
    running (nothing had yet taken charge of shutting the instance down): here each moment's
    KeyboardInterrupt is raised on purpose, with Ray itself replaced by stand-ins. The instance
    is ended once, before the command says it was interrupted (not whenever the rows happen to
    be collected)."""
    import cvt.predict
    import cvt.ray

    monkeypatch.setattr(cvt.ray, "connect", lambda address: True)
    monkeypatch.setattr(cvt.ray, "disconnect", lambda: print("(ray shut down)", file=sys.stderr))
    monkeypatch.setattr(cvt.ray, "cluster_layout", lambda *args, **kwargs: cvt.ray.Layout(1, 1, False))
    monkeypatch.setattr(cvt.ray, "classify_dataset", lambda *args, **kwargs: None)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    if moment == "as the actors are asked for":
        monkeypatch.setattr(cvt.ray.log, "info", ctrl_c)
    else:
        monkeypatch.setattr(cvt.predict, "write_atomic", ctrl_c)
    model = save_tiny_classifier(tmp_path / "model")
    photos = make_folder(tmp_path / "photos", 2)
    args = ["predict", str(model), str(photos), "--format", "jsonl", "--output", str(tmp_path / "out.jsonl")]
    assert main([*args, "--ray"]) == 130
    stderr = capsys.readouterr().err
    assert stderr.count("(ray shut down)") == 1 and stderr.index("(ray shut down)") < stderr.index("cvt: interrupted")


def test_ending_what_outlives_ray_goes_on_past_a_process_that_ended_meanwhile(monkeypatch) -> None:
    """After Ray's shutdown, a process that ends between the wait and its SIGTERM must not stop
    the others from being ended (on a busy machine Ray's workers end at any moment)."""
    from cvt.ray import _end_processes

    children = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        first, second = (psutil.Process(child.pid) for child in children)

        def ended_meanwhile() -> None:
            raise psutil.NoSuchProcess(first.pid)

        monkeypatch.setattr(first, "terminate", ended_meanwhile)
        _end_processes([first, second], 0.2)
        assert not second.is_running()
    finally:
        for child in children:
            child.kill()
            child.wait()


@pytest.mark.subprocess
def test_an_unreachable_address_is_an_error_at_once(model_dir, tmp_path) -> None:
    """--ray HOST:PORT where nothing listens: one line naming the address, exit status 2, well
    within 30 s (Ray itself would retry for minutes, deaf to Ctrl-C)."""
    (tmp_path / "a.png").write_bytes(b"")
    started = time.monotonic()
    done = run_cvt("predict", str(model_dir), str(tmp_path / "a.png"), "--ray", f"127.0.0.1:{free_port()}",
                   timeout=60)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    assert re.fullmatch(r"cvt: error: --ray 127\.0\.0\.1:\d+: no Ray cluster answers there .*",
                        done.stderr.splitlines()[-1])


def test_an_output_that_cannot_be_written_is_refused_before_ray_starts(model_dir, folder, tmp_path,
                                                                       capsys) -> None:
    """A folder, or a path under a file, as --output: refused, naming --output, before any Ray
    start-up (the address here reaches nothing, so reaching it would be another error)."""
    (tmp_path / "file").write_text("")
    for output in (tmp_path, tmp_path / "file" / "out.jsonl"):
        assert main(["predict", str(model_dir), str(folder), "--format", "jsonl", "--output", str(output),
                     "--ray", f"127.0.0.1:{free_port()}"]) == 2
        assert f"--output {output} " in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_cluster_that_dies_mid_run_has_its_own_exit_status(model_dir, tmp_path) -> None:
    """The GCS of the cluster killed (SIGKILL) while rows stream in: the run ends within a
    minute (before Ray's own exit after a minute, with status 1, as if files had failed) with
    exit status 4 and one line saying the cluster was lost, and the rows finished before are in
    --output as whole rows."""
    photos = make_folder(tmp_path / "many", 1500)
    env = {**ray_env(secrets.token_hex(16)), "CVT_TEST_CLUSTER": secrets.token_hex(8)}
    out = tmp_path / "out.jsonl"
    with ray_cluster([2], env) as address:
        child, _ = predict_until_rows_flow(model_dir, photos, out, address, env, rows=20)
        _a_process_of(env["CVT_TEST_CLUSTER"], "gcs_server").kill()
        killed = time.monotonic()
        assert child.poll() is None, "the run ended before the kill"
        _, stderr = child.communicate(timeout=300)
    assert child.returncode == 4, stderr
    assert time.monotonic() - killed < 50, "Ray's own exit came first"
    assert re.search(r"cvt: error: the Ray cluster was lost after \d+ of 1521 files", stderr), stderr
    rows = read_jsonl(out)
    assert 20 <= len(rows) < 1521 and all(list(row) == ROW_KEYS for row in rows)
    assert list(tmp_path.glob(".out.jsonl.*.tmp")) == []


def test_actors_get_the_cores_of_their_nodes(caplog) -> None:
    """The layout of a run's actors, from its nodes' CPUs: by default one per node with all its
    CPUs (two on a node twice the smallest); --workers N alone, N actors as large as still fit;
    --cpus-per-worker C alone, as many of C as fit; more than fit, a warning and what fits."""
    from cvt.ray import Layout, plan_layout

    assert plan_layout([2]) == Layout(actors=1, cpus=2)
    assert plan_layout([1, 1]) == Layout(actors=2, cpus=1)
    assert plan_layout([8, 8, 8]) == Layout(actors=3, cpus=8)
    assert plan_layout([4, 8]) == Layout(actors=3, cpus=4)
    assert plan_layout([0, 4, 4]) == Layout(actors=2, cpus=4)  # a head node kept free of work
    assert plan_layout([8, 8], workers=2) == Layout(actors=2, cpus=8)
    assert plan_layout([8, 8], workers=3) == Layout(actors=3, cpus=4)
    assert plan_layout([2], workers=2) == Layout(actors=2, cpus=1)
    assert plan_layout([8, 8], cpus_per_worker=3) == Layout(actors=4, cpus=3)
    assert plan_layout([8, 8], workers=2, cpus_per_worker=2) == Layout(actors=2, cpus=2)
    assert plan_layout([8, 8], gpus=2) == Layout(actors=2, cpus=1, gpu=True)
    assert not caplog.records
    assert plan_layout([2], workers=3) == Layout(actors=2, cpus=1)
    assert "--workers 3, but the cluster has 2 CPUs: running 2 actors" in caplog.text
    assert plan_layout([4, 2], workers=5, cpus_per_worker=2) == Layout(actors=3, cpus=2)
    assert "--workers 5, but the cluster has room for 3 actors of 2 CPUs: running 3 actors" in caplog.text


def test_impossible_layouts_are_one_line(model_dir, tmp_path, capsys) -> None:
    """Actors larger than every node, or no node with a CPU: clear errors, not a run that waits
    forever for room; --cpus-per-worker without --ray, or below 1, refused before any work."""
    from cvt.errors import ClusterError, InvalidValueError
    from cvt.ray import plan_layout

    with pytest.raises(InvalidValueError, match="--cpus-per-worker 16: no node of the cluster has 16 CPUs"):
        plan_layout([8, 4], cpus_per_worker=16)
    with pytest.raises(ClusterError, match="no node with a CPU"):
        plan_layout([0])
    (tmp_path / "a.png").write_bytes(b"")
    for args, message in [(["--cpus-per-worker", "2"], "give --ray"),
                          (["--ray", "--cpus-per-worker", "0"], "--cpus-per-worker must be a positive")]:
        assert main(["predict", str(model_dir), str(tmp_path / "a.png"), *args]) == 2
        assert message in capsys.readouterr().err.splitlines()[-1]
