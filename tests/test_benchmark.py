"""The benchmark harness compares like with like, refuses to time models that disagree, and prints
what it measured: median times and per-round ratios (no speed is asserted here: speed is shown by
`cvt bench`, recorded in benchmarks/README.md)."""

from __future__ import annotations

import io

import pytest
import torch

from cvt import benchmark


def test_harness_runs_both_sides_on_identical_weights() -> None:
    case = benchmark.Case("tiny", (1, 2, 3), 64, 2, rounds=1)
    theirs, ours = benchmark.build_pair(case, torch.device("cpu"))
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[key]), key
    (result,) = benchmark.run_case(case, torch.device("cpu"), rounds=1, engines=False)
    assert result["side"] == "cvt model(x)" and result["precision"] == "fp32"
    assert result["max_abs_diff"] <= benchmark.TOLERANCE
    # one round: the speed-up is the quotient of the two measured times, and the rates follow
    assert result["transformers_s"] > 0 and result["seconds"] > 0
    assert result["speedup"] == result["speedup_min"] == result["speedup_max"]
    assert result["speedup"] == pytest.approx(result["transformers_s"] / result["seconds"], rel=1e-12)
    assert result["images_per_s"] == pytest.approx(case.batch / result["seconds"], rel=1e-12)


def test_printed_table_gives_median_times_and_per_round_ratios(monkeypatch) -> None:
    """Each round's ratio is transformers' time over ours in that round; the table prints the
    medians of the times and of the ratios, with the smallest and largest ratio."""
    times = {"transformers": [0.30, 0.20, 0.40], "cvt model(x)": [0.10, 0.10, 0.20]}  # ratios 3, 2, 2
    monkeypatch.setattr(benchmark, "_alternate", lambda *args: times)
    monkeypatch.setattr(benchmark, "gemm_peak", lambda device: 100.0)  # GFLOP/s
    case = benchmark.Case("tiny", (1, 2, 3), 64, 2, rounds=3)
    out = io.StringIO()
    (row,) = benchmark.run([case], memory=False, rounds=3, engines=False, out=out)
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
    case = benchmark.Case("tiny", (1, 2, 3), 64, 2, training=training)
    original = benchmark.build_pair

    def broken_pair(case, device, seed=0):
        theirs, ours = original(case, device, seed)
        with torch.no_grad():
            ours.classifier.weight[0].add_(0.5)  # (a shift of all logits would not change the loss)
        return theirs, ours

    monkeypatch.setattr(benchmark, "build_pair", broken_pair)
    with pytest.raises(SystemExit, match="outputs differ"):
        benchmark.run_case(case, torch.device("cpu"), rounds=1, engines=False)
