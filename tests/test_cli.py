"""`cvt info` (parameter and multiply-add counts against the paper and transformers) and CLI errors."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import cvt
from cvt.cli import build_parser, main
from conftest import tiny_config

# parameters from the reference implementation; multiply-adds (G) from the paper's Table 2/3
REFERENCE = {
    "cvt-13": (19_997_480, 4.5),
    "cvt-21": (31_622_696, 7.1),
    "cvt-13-384": (19_997_480, 16.3),
    "cvt-w24-384-22k": (277_196_392, None),
}


def info(capsys, *args) -> str:
    assert main(["info", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", REFERENCE)
def test_info_counts_match_the_reference(name, capsys) -> None:
    params, gmacs = REFERENCE[name]
    out = info(capsys, name)
    assert f"parameters: {params:,}" in out
    macs = float(out.split("multiply-adds per image at ")[1].split(": ")[1].split(" G")[0])
    if gmacs is not None:
        assert abs(macs / gmacs - 1) < 0.02, (macs, gmacs)
    assert "stage" in out and "dw_bn" in out


@pytest.mark.parametrize("config, size", [
    (tiny_config(), (64, 48)),
    (tiny_config(cls_token=[False, False, False], stride_kv=[1, 2, 3], padding_kv=[0, 1, 1]), (61, 77)),
    pytest.param(cvt.CvtConfig(num_labels=1000), (224, 224), marks=pytest.mark.slow),  # CvT-13
])
def test_multiply_adds_equal_what_transformers_executes(config, size) -> None:
    """The analytic count equals torch's FLOP counter (2 FLOPs per multiply-add) run on
    transformers' backbone: convolutions, linear layers and both attention products (plus
    the classifier, which transformers cannot run without a cls token)."""
    hf_config = transformers.CvtConfig(**{f: list(getattr(config, f)) for f in config.stage_fields()},
                                       num_labels=config.num_labels)
    model = transformers.CvtModel(hf_config).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, *size))
    head = config.embed_dim[-1] * config.num_labels
    assert config.macs_per_image(*size) == counter.get_total_flops() // 2 + head


def test_info_on_a_folder_uses_its_config(tmp_path, capsys) -> None:
    cvt.CvtForImageClassification(tiny_config()).save_pretrained(tmp_path)
    out = info(capsys, str(tmp_path), "--image-size", "64")
    assert str(tmp_path) in out and "16x16" in out and "labels: 5" in out


def test_unknown_model_is_one_clear_line(capsys) -> None:
    assert main(["info", "cvt-99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvt: error:") and "cvt-13" in err and "Traceback" not in err


@pytest.mark.subprocess
def test_console_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "cvt", "info", "cvt-13"], capture_output=True, text=True)
    assert result.returncode == 0 and "19,997,480" in result.stdout


def test_version_and_help_for_every_subcommand_and_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cvt {importlib.metadata.version('cvt-vision')}"
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {choice.dest: choice.help for choice in subcommands._choices_actions}
    missing = [name for name in subcommands.choices if not listed.get(name)]
    for name, sub in subcommands.choices.items():
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS and not a.help]
    assert missing == []
    assert {"info", "convert", "train", "eval", "demo", "predict", "export", "bench"} <= set(subcommands.choices)
