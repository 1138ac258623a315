"""CvtConfig: transformers' fields and defaults, config.json both ways, validation."""

from __future__ import annotations

import json

import pytest
import transformers

import cvt
from cvt import CvtConfig
from cvt.checkpoints.read import read_config


def test_defaults_equal_transformers() -> None:
    ours = CvtConfig().to_dict()
    theirs = transformers.CvtConfig().to_dict()
    for key, value in ours.items():
        if key in ("hidden_act", "id2label", "label2id"):
            continue
        assert key in theirs, key
        expected = theirs[key]
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, key
    assert CvtConfig().num_labels == transformers.CvtConfig().num_labels == 2


def test_reads_transformers_config_json(tmp_path) -> None:
    hf = transformers.CvtConfig(depth=[1, 4, 16], num_labels=7, problem_type="multi_label_classification")
    hf.save_pretrained(tmp_path)
    config = read_config(tmp_path / "config.json")
    assert config.depth == (1, 4, 16)
    assert config.num_labels == 7 and config.id2label[6] == "LABEL_6"
    assert config.problem_type == "multi_label_classification"
    assert config.hidden_act == "gelu"  # transformers' activation, so its checkpoints match
    assert config.model_type == "cvt" and config.label2id["LABEL_6"] == 6


def test_json_round_trip_is_lossless(tmp_path) -> None:
    config = CvtConfig(
        embed_dim=[24, 48], num_heads=[2, 4], depth=[1, 3], patch_sizes=[7, 3], patch_stride=[4, 2],
        patch_padding=[2, 1], mlp_ratio=[4.0, 2.5], attention_drop_rate=[0.0, 0.1], drop_rate=[0.0, 0.0],
        drop_path_rate=[0.0, 0.2], qkv_bias=[True, False], cls_token=[True, True],
        qkv_projection_method=["avg", "linear"], kernel_qkv=[3, 3], padding_kv=[1, 1],
        stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], hidden_act="quick_gelu",
        id2label={0: "cat", 1: "dog", 2: "bird"}, problem_type="single_label_classification",
        image_size=224, custom=[1, 2])  # keywords no field names are kept, as transformers keeps them
    text = config.to_json_string()
    again = CvtConfig.from_dict(json.loads(text))
    assert again.to_json_string() == text
    assert again.label2id == {"cat": 0, "dog": 1, "bird": 2} and again.image_size == 224
    config.save_pretrained(tmp_path)
    assert CvtConfig.from_pretrained(tmp_path).to_json_string() == text


def test_transformers_reads_ours(tmp_path) -> None:
    config = CvtConfig(depth=(1, 1, 3), num_labels=4, hidden_act="quick_gelu")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    hf = transformers.CvtConfig.from_pretrained(tmp_path)
    assert list(hf.depth) == [1, 1, 3] and hf.num_labels == 4 and hf.model_type == "cvt"


@pytest.mark.parametrize("changes, field", [
    (dict(depth=(1, 2)), "depth"),
    (dict(embed_dim=(64, 192, 385)), "embed_dim"),
    (dict(qkv_projection_method=("dw_bn", "conv", "dw_bn")), "qkv_projection_method"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(patch_stride=(4, 0, 2)), "patch_stride"),
    (dict(embed_dim=(64, -192, 384)), "embed_dim"),
    (dict(drop_path_rate=(0.0, 0.0, 1.0)), "drop_path_rate"),
    (dict(attention_drop_rate=(0.0, -0.1, 0.0)), "attention_drop_rate"),
    (dict(depth=(1, "2", 10)), "depth"),
    (dict(embed_dim=64), "embed_dim"),
    (dict(qkv_bias=(1, 1, 1)), "qkv_bias"),
    (dict(problem_type="ranking"), "problem_type"),
    (dict(stride_q=(2, 1, 1)), "stride_q"),
])
def test_validation_names_the_field(changes, field) -> None:
    with pytest.raises(ValueError, match=field):
        CvtConfig(**changes)


def test_wrong_type_in_config_json_is_reported_with_the_file(tmp_path) -> None:
    data = CvtConfig().to_dict() | {"embed_dim": "64,192,384"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(cvt.CheckpointError, match=r"config\.json.*embed_dim"):
        read_config(tmp_path / "config.json")


def test_other_model_type_is_refused() -> None:
    with pytest.raises(ValueError, match="'vit'"):
        CvtConfig.from_dict({"model_type": "vit", "hidden_size": 768})


def test_num_labels_replace_relabels() -> None:
    config = cvt.get_variant("cvt-13").config()
    assert config.num_labels == 1000 and config.id2label[281] == "tabby, tabby cat"
    small = config.replace(num_labels=3)
    assert small.num_labels == 3 and small.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match="num_labels"):
        CvtConfig(num_labels=3, id2label={0: "a"})
