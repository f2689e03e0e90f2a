"""The CR-FIQA target by hand, the SmoothL1 regression and the combined objective."""

import pytest
import torch
import torch.nn.functional as F

from facerec.heads import create_margin
from facerec.losses import FaceRecognitionLoss, cr_target, quality_regression_loss

pytestmark = pytest.mark.timeout(120)


def test_cr_target_by_hand():
    cosine = torch.tensor([[0.8, 0.3, -0.2, 0.1], [0.1, 0.2, 0.6, 0.5], [-0.4, -0.1, 0.0, -0.5]])
    labels = torch.tensor([0, 2, 3])
    want = torch.tensor([0.8 / (0.3 + 1 + 1e-9), 0.6 / (0.5 + 1 + 1e-9), -0.5 / (0.0 + 1 + 1e-9)])
    torch.testing.assert_close(cr_target(cosine, labels), want)


def test_cr_target_is_detached_and_zero_for_ignored_rows():
    cosine = torch.rand(3, 5, requires_grad=True)
    target = cr_target(cosine, torch.tensor([1, -1, 4]))
    assert not target.requires_grad
    assert target[1] == 0


def test_smooth_l1_beta_half():
    pred = torch.tensor([0.0, 0.0, 1.0])
    target = torch.tensor([0.2, 1.0, -0.5])
    # |d| < beta: 0.5 d^2 / beta ; else |d| - 0.5 beta
    want = ((0.5 * 0.04 / 0.5) + (1.0 - 0.25) + (1.5 - 0.25)) / 3
    assert quality_regression_loss(pred, target).item() == pytest.approx(want)


def test_combined_objective_is_ce_plus_ten_times_quality_on_unmargined_cosines():
    torch.manual_seed(0)
    b, c, d = 12, 9, 8
    loss = FaceRecognitionLoss(c, d, margin="cosface")
    embeddings = torch.randn(b, d)
    labels = torch.randint(0, c, (b,))
    quality = torch.randn(b, requires_grad=True)
    out = loss(embeddings, labels, quality)
    cosine = F.normalize(embeddings) @ F.normalize(loss.centres.weight.detach()).t()
    ce = F.cross_entropy(create_margin("cosface")(cosine, labels), labels)
    target = cr_target(cosine, labels)
    reg = F.smooth_l1_loss(quality, target, beta=0.5)
    torch.testing.assert_close(out.quality_target, target)
    torch.testing.assert_close(out.total, ce + 10.0 * reg)
    out.total.backward()
    assert quality.grad is not None and torch.isfinite(quality.grad).all()


def test_classes_outside_the_quality_mask_do_not_drive_the_quality_target():
    torch.manual_seed(1)
    b, c, d = 10, 6, 8
    loss = FaceRecognitionLoss(c, d, margin="arcface")
    embeddings = torch.randn(b, d)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4, 5, 5])  # classes 2 and 3: one image each
    mask = torch.tensor([True, True, False, False, True, True])
    loss.set_quality_classes(mask)
    quality = torch.randn(b, requires_grad=True)
    out = loss(embeddings, labels, quality)
    out.total.backward()
    keep = mask[labels]
    cosine = F.normalize(embeddings) @ F.normalize(loss.centres.weight.detach()).t()
    want = F.smooth_l1_loss(quality[keep], cr_target(cosine, labels)[keep], beta=0.5)
    torch.testing.assert_close(out.quality, want)
    assert torch.all(quality.grad[~keep] == 0) and torch.all(quality.grad[keep] != 0)
    with pytest.raises(ValueError, match="one entry per class"):
        loss.set_quality_classes(torch.ones(3, dtype=torch.bool))
