"""cvt as the backbone of real detection and segmentation models: torchvision's FasterRCNN on a
feature pyramid over CvT-13's stages, and an FCN head on its features, as the README shows."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import cvt


class CvtFPN(nn.Module):
    """The README's pyramid: cvt's stage maps through torchvision's FPN, as FasterRCNN wants
    (an ordered dict of maps, `out_channels`)."""

    def __init__(self, features: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.body = features
        self.fpn = FeaturePyramidNetwork(features.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(images))))


def synthetic_detection_batch(n: int = 2, size: int = 160):
    torch.manual_seed(0)
    images = [torch.rand(3, size, size) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 80.0, 100.0], [60.0, 30.0, 150.0, 140.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(n)]
    return images, targets


@pytest.mark.slow
def test_faster_rcnn_on_cvt13_features_trains_and_evaluates():
    backbone = CvtFPN(cvt.create_model("cvt-13", features_only=True))
    # one anchor size per pyramid level: the three stages and the FPN's max-pooled level
    detector = FasterRCNN(
        backbone, num_classes=3, min_size=160, max_size=256,
        rpn_anchor_generator=AnchorGenerator(((32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 4),
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2))
    images, targets = synthetic_detection_batch()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    stem = backbone.body.cvt.encoder.stages[0].embedding.convolution_embeddings.projection.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0  # the detector's loss reaches the stem
    optimizer.step()
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for found in detections:
        assert found["boxes"].shape[1:] == (4,) and found["boxes"].shape[0] == found["scores"].shape[0]
        assert torch.isfinite(found["boxes"]).all()


class CvtSegmenter(nn.Module):
    """The README's segmentation model: an FCN head on the stride-16 map, upsampled to the input."""

    def __init__(self, features: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = FCNHead(features.feature_info.channels()[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(images)[-1])
        return nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.slow
def test_segmentation_head_loss_falls():
    torch.manual_seed(0)
    features = cvt.create_model("cvt-13", features_only=True, out_indices=[-1], depth=(1, 1, 2),
                                embed_dim=(16, 32, 64), num_heads=(1, 1, 2))
    model = CvtSegmenter(features, num_classes=2)
    # images with one bright square each; the mask marks the square
    images, masks = torch.rand(4, 3, 64, 64) * 0.5, torch.zeros(4, 64, 64, dtype=torch.long)
    for i, (top, left) in enumerate([(4, 8), (20, 30), (36, 10), (10, 40)]):
        images[i, :, top:top + 20, left:left + 20] += 0.5
        masks[i, top:top + 20, left:left + 20] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    model.train()
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 0.88 -> 0.42
