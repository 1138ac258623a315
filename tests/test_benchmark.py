"""The benchmark harness compares like with like and refuses to time models that disagree
(no timing is asserted here: speed is shown by `cvt bench`, recorded in benchmarks/README.md)."""

from __future__ import annotations

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
    assert result["side"] == "cvt model(x)" and result["speedup"] > 0
    assert result["max_abs_diff"] <= benchmark.TOLERANCE


@pytest.mark.parametrize("training", [False, True])
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
