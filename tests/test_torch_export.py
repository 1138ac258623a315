"""`torch.export` sees through cvt's outputs: with the default `return_dict=True`, both models
export with a dynamic batch (1-8) and dynamic height and width (48-320 pixels, odd and
non-square sizes too), and the exported module returns the same output classes, read by key,
equal to eager."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_, tiny_config

from cvt import BaseModelOutputWithCLSToken, CvtForImageClassification, CvtModel, ImageClassifierOutput
from cvt.modeling import ImageClassifierOutputWithNoAttention

SIZES = [(1, 48, 320), (3, 97, 61), (8, 320, 224)]  # (batch, height, width) run after export
DYNAMIC = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=8),
                            2: torch.export.Dim("height", min=48, max=320),
                            3: torch.export.Dim("width", min=48, max=320)}}


@pytest.mark.slow  # 35-50 s each on 2 busy cores: tracing with symbolic sizes
@pytest.mark.parametrize("model_class, key", [(CvtForImageClassification, "logits"),
                                              (CvtModel, "last_hidden_state")])
def test_exported_model_equals_eager_at_three_sizes(model_class, key):
    model = randomise_(model_class(tiny_config()), seed=0).eval()
    example = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        exported = torch.export.export(model, (example,), dynamic_shapes=DYNAMIC).module()
        for batch, height, width in SIZES:
            x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
            want, got = model(x), exported(x)
            assert type(got) is type(want)
            assert got.keys() == want.keys()
            for name in want.keys():
                scale = want[name].abs().max().item()
                difference = (got[name] - want[name]).abs().max().item()
                assert difference <= 1e-5 * scale, (name, batch, height, width, difference, scale)
            assert got[key].shape[0] == batch


def test_output_classes_have_honest_names_and_keep_the_old_one():
    assert ImageClassifierOutputWithNoAttention is ImageClassifierOutput
    assert "attentions" in ImageClassifierOutput.__dataclass_fields__
    assert "attentions" in BaseModelOutputWithCLSToken.__dataclass_fields__
