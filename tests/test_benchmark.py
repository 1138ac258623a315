"""The benchmark harness compares like with like, refuses to time models that disagree, and prints
what it measured: median times and per-round ratios (no speed is asserted here: speed is shown by
`cvt bench`, recorded in benchmarks/README.md)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from cvt import bench
from conftest import RAY_TESTS


def test_harness_runs_both_sides_on_identical_weights() -> None:
    case = bench.Case("tiny", (1, 2, 3), 64, 2, rounds=1)
    theirs, ours = bench.build_pair(case, torch.device("cpu"))
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[key]), key
    (result,) = bench.run_case(case, torch.device("cpu"), rounds=1, engines=False)
    assert result["side"] == "cvt model(x)" and result["precision"] == "fp32"
    assert result["max_abs_diff"] <= bench.TOLERANCE
    # one round: the speed-up is the quotient of the two measured times, and the rates follow
    assert result["transformers_s"] > 0 and result["seconds"] > 0
    assert result["speedup"] == result["speedup_min"] == result["speedup_max"]
    assert result["speedup"] == pytest.approx(result["transformers_s"] / result["seconds"], rel=1e-12)
    assert result["images_per_s"] == pytest.approx(case.batch / result["seconds"], rel=1e-12)


def test_printed_table_gives_median_times_and_per_round_ratios(monkeypatch) -> None:
    """Each round's ratio is transformers' time over ours in that round; the table prints the
    medians of the times and of the ratios, with the smallest and largest ratio."""
    times = {"transformers": [0.30, 0.20, 0.40], "cvt model(x)": [0.10, 0.10, 0.20]}  # ratios 3, 2, 2
    monkeypatch.setattr(bench, "_alternate", lambda *args: times)
    monkeypatch.setattr(bench, "gemm_peak", lambda device: 100.0)  # GFLOP/s
    case = bench.Case("tiny", (1, 2, 3), 64, 2, rounds=3)
    out = io.StringIO()
    (row,) = bench.run([case], memory=False, rounds=3, engines=False, out=out)
    assert (row["transformers_s"], row["seconds"]) == (0.30, 0.10)
    assert (row["speedup"], row["speedup_min"], row["speedup_max"]) == pytest.approx((2.0, 2.0, 3.0))
    lines = out.getvalue().splitlines()
    assert lines[1] == "fp32 GEMM peak (2048x2048 mm, median): 100 GFLOP/s"
    assert "tiny: transformers 0.300 s" in lines
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["side", "s", "speed-up"])
    cells = lines[header + 1].split()
    assert cells[:5] == ["cvt", "model(x)", "0.100", "2.00x", "[2.00-3.00]"]
    assert float(cells[5]) == pytest.approx(case.batch / 0.10, abs=0.05)  # images/s, printed to 0.1
    assert cells[6] == f"{100 * row['gflops'] / 100.0:.0f}%"


@pytest.mark.parametrize("training", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_disagreement_stops_the_benchmark(training, monkeypatch) -> None:
    case = bench.Case("tiny", (1, 2, 3), 64, 2, training=training)
    original = bench.build_pair

    def broken_pair(case, device, seed=0):
        theirs, ours = original(case, device, seed)
        with torch.no_grad():
            ours.classifier.weight[0].add_(0.5)  # (a shift of all logits would not change the loss)
        return theirs, ours

    monkeypatch.setattr(bench, "build_pair", broken_pair)
    with pytest.raises(SystemExit, match="outputs differ"):
        bench.run_case(case, torch.device("cpu"), rounds=1, engines=False)


def test_auto_verdict_names_the_choice_against_the_fastest_engine(monkeypatch) -> None:
    monkeypatch.setenv("CVT_AUTO_ENGINE", "measure")
    rows = [{"side": "cvt model(x)", "precision": "fp32", "seconds": 0.5, "auto_choice": False},
            {"side": "engine torch", "precision": "fp32", "seconds": 0.40, "auto_choice": False},
            {"side": "engine onnxruntime", "precision": "fp32", "seconds": 0.42, "auto_choice": True},
            {"side": "engine openvino int8", "precision": "int8", "seconds": 0.2, "auto_choice": False}]
    assert bench._auto_verdict(rows) == ("auto chose engine onnxruntime (measured): 5.0 % slower "
                                            "than engine torch in these rounds")
    rows[2]["seconds"] = 0.39
    assert bench._auto_verdict(rows) == ("auto chose engine onnxruntime (measured): the fastest fp32 "
                                            "engine in these rounds")
    assert bench._auto_verdict([{**r, "auto_choice": False} for r in rows]) is None


@pytest.mark.slow
def test_reduced_precision_is_judged_on_the_trained_model(monkeypatch, tmp_path) -> None:
    """The quality rows come from the kept trained checkpoint and its held-out images, int8
    calibrated on its training images (a tiny classifier stands in for the digits model)."""
    from conftest import save_tiny_classifier, write_images

    folder = tmp_path / "digits"
    save_tiny_classifier(folder / "best", image_size=32)
    write_images(folder / "data" / "train", count=10)
    write_images(folder / "data" / "val", count=15)
    monkeypatch.setattr(bench, "digits_run", lambda root=None: folder)
    monkeypatch.setattr(bench, "reduced_engines", lambda device: [("onnxruntime", "int8")])
    out = io.StringIO()
    (row,) = bench.trained_quality(torch.device("cpu"), out)
    assert row["trained_side"] == "engine onnxruntime int8" and row["images"] == 15
    assert 0 < row["max_abs_logit_error"] < 1 and 0 <= row["top1_agreement"] <= 1
    assert row["fp32_accuracy"] is not None
    lines = out.getvalue().splitlines()
    assert "the demo's digits CvT, 15 held-out images" in lines[1]
    assert lines[-1].split()[:3] == ["engine", "onnxruntime", "int8"]


@pytest.mark.slow
def test_bf16_training_case_runs_both_sides_under_autocast(monkeypatch) -> None:
    """The bf16 training row times transformers' and our training steps under bf16 autocast and
    shows how far the losses are apart, without the fp32 bar."""
    seen = []
    original = bench.build_pair

    def watched_pair(case, device, seed=0):
        pair = original(case, device, seed)
        for model in pair:
            model.classifier.register_forward_hook(lambda *args: seen.append(torch.is_autocast_enabled("cpu")))
        return pair

    monkeypatch.setattr(bench, "build_pair", watched_pair)
    case = bench.Case("tiny", (1, 2, 3), 64, 2, training=True, precision="bf16")
    (row,) = bench.run_case(case, torch.device("cpu"), rounds=1, engines=False)
    assert (row["side"], row["precision"]) == ("cvt", "bf16")
    assert seen and all(seen)
    assert row["max_abs_diff"] < 0.05 * math.log(1000)  # both losses start near ln(1000)


def test_the_json_names_the_cpu_date_and_commit_the_docs_quote(monkeypatch, tmp_path) -> None:
    """`cvt bench --json` writes what a results file needs to be quoted: lscpu's model name, the
    UTC date and the commit of the code measured, beside the rows."""
    import argparse
    import json
    import subprocess
    import time

    rows = [{"case": "tiny", "side": "cvt model(x)", "speedup": 1.5}]
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: rows)
    args = argparse.Namespace(case=None, memory=None, no_memory=True, rounds=1, no_engines=True,
                              json=str(tmp_path / "run.json"))
    assert bench.run_command(args) == 0
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["results"] == rows
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f"model name\t: {written['cpu']}\n" in cpuinfo
    assert written["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bench.__file__.rsplit("/", 1)[0],
                          capture_output=True, text=True).stdout.strip()
    assert written["commit"] in (head, f"{head}-dirty")


@pytest.mark.slow
@pytest.mark.subprocess
@RAY_TESTS
def test_the_ray_scaling_script_runs_at_a_tiny_size(tmp_path) -> None:
    """benchmarks/ray_scaling.py on 200 files and a tiny model: its four runs finish (each checks
    that every file is in its output); the two-node cluster's run has results from both nodes
    and the one-thread run's labels for every file; its JSON names the CPU, date, commit and both
    ratios (whose values, at this size, say nothing)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT, save_tiny_classifier

    model = save_tiny_classifier(tmp_path / "model")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "ray_scaling.py"), "--files", "200",
                           "--model", str(model), "--json", str(tmp_path / "out.json")], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert set(result["results"]) == {"alone", "ray, one machine", "one thread (taskset)", "ray, two 1-CPU nodes"}
    assert result["cpu"] and result["cpu"] == result["machine"]["cpu"]
    assert result["date"] and result["commit"] and result["engine"] == "torch"
    assert set(result["ratios"]) == {"ray on one machine / cvt predict", "two 1-CPU nodes / one thread"}
    assert "images/s" in done.stdout
    assert "two 1-CPU nodes: results from both nodes, the one-thread run's labels for all 200 files" in done.stdout
