"""Each metric against a small case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.training.metrics import SegmentationMetrics


def _logits(pred: list, classes: int = 4) -> torch.Tensor:
    return F.one_hot(torch.tensor(pred), classes).permute(0, 3, 1, 2).float() * 20  # softmax ~ one-hot


def test_multiclass_by_hand() -> None:
    truth = torch.tensor([[[0, 1], [2, 3]]])
    pred = [[[0, 1], [2, 2]]]
    m = SegmentationMetrics("multiclass", torch.device("cpu"))
    m.update(_logits(pred), truth, torch.tensor(0.5))
    out = m.compute()
    assert out["pixel_accuracy"] == pytest.approx(3 / 4)
    # IoU per class: bg 1/1, NCR 1/1, ED 1/2 (one false positive), ET 0/1
    assert out["mean_iou"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    # WT {1,2,3}: 3 true, 3 predicted, all overlap; TC {1,3}: truth 2 px, pred 1 px, 1 overlap; ET: missed
    assert out["dice_WT"] == pytest.approx(1.0)
    assert out["dice_TC"] == pytest.approx(2 * 1 / (2 + 1))
    assert out["dice_ET"] == pytest.approx(0.0)
    assert out["dice_mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert out["loss"] == pytest.approx(0.5)
    # MSE: the one wrong pixel adds (1-0)^2 + (0-1)^2 = 2 over 4 pixels x 4 classes (softmax of 20-logits ~ one-hot)
    assert out["mse"] == pytest.approx(2 / 16, abs=1e-6)


def test_region_absent_from_both_counts_one_and_false_positive_zero() -> None:
    truth = torch.zeros(2, 3, 3, dtype=torch.long)
    truth[0, 1, 1] = 2  # slice 0: oedema only; slice 1: no tumour at all
    pred = truth.clone()
    pred[1, 0, 0] = 3  # slice 1 predicts an ET pixel that is not there
    m = SegmentationMetrics("multiclass", torch.device("cpu"))
    m.update(_logits(pred.tolist()), truth)
    out = m.compute()
    # slice 0: WT 1, TC empty both -> 1, ET empty both -> 1; slice 1: WT 0, TC 0, ET 0 (false positives)
    assert out["dice_WT"] == pytest.approx(0.5)
    assert out["dice_TC"] == pytest.approx(0.5)
    assert out["dice_ET"] == pytest.approx(0.5)
    assert math.isnan(out["loss"])


def test_sums_do_not_depend_on_batching() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 8, 8)
    truth = torch.randint(0, 4, (6, 8, 8))
    whole = SegmentationMetrics("multiclass", torch.device("cpu"))
    whole.update(logits, truth)
    parts = SegmentationMetrics("multiclass", torch.device("cpu"))
    for i in (0, 1, 4):
        j = {0: 1, 1: 4, 4: 6}[i]
        parts.update(logits[i:j], truth[i:j])
    a, b = whole.compute(), parts.compute()
    assert all(a[k] == pytest.approx(b[k]) or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_binary_task_reports_whole_tumour_only() -> None:
    truth = torch.tensor([[[0, 1], [1, 1]]])
    m = SegmentationMetrics("binary", torch.device("cpu"))
    m.update(_logits([[[0, 1], [0, 1]]], 2), truth)
    out = m.compute()
    assert out["dice_WT"] == pytest.approx(2 * 2 / (3 + 2))
    assert "dice_ET" not in out and out["dice_mean"] == out["dice_WT"]


def test_class_counts_equal_smp_get_stats_on_random_batches() -> None:
    import segmentation_models_pytorch as smp

    from trainer.training.metrics import class_counts

    generator = torch.Generator().manual_seed(0)
    for classes in (2, 4):
        pred = torch.randint(0, classes, (5, 17, 13), generator=generator)
        target = torch.randint(0, classes, (5, 17, 13), generator=generator)
        expected = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=classes)[:3]
        for ours, theirs in zip(class_counts(pred, target, classes), expected):
            assert torch.equal(ours, theirs.sum(0))


def test_region_dice_equals_smp_f1_and_the_volume_dice() -> None:
    """The one Dice (``dice_from_counts``) on the device per slice, against smp's F1 on the same masks and against
    the whole-volume ``trainer.scoring.brats.dice`` slice by slice."""
    import numpy as np
    import segmentation_models_pytorch as smp

    from builder.format import REGIONS
    from trainer.scoring.brats import dice
    from trainer.training.metrics import region_dice

    generator = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 4, (6, 9, 11), generator=generator)
    target = torch.randint(0, 4, (6, 9, 11), generator=generator)
    pred[0], target[0] = 0, 0  # empty in both: 1
    def region_masks(labels: torch.Tensor, _task: str) -> torch.Tensor:  # (B, R, H, W) 0/1, by np.isin per region
        return torch.from_numpy(np.stack([np.isin(labels.numpy(), v) for v in REGIONS.values()], 1).astype(np.int64))

    ours = region_dice(pred, target, "multiclass")
    stats = smp.metrics.get_stats(region_masks(pred, "multiclass"), region_masks(target, "multiclass"), mode="multilabel")
    assert torch.allclose(ours, smp.metrics.f1_score(*stats, reduction="none", zero_division=1.0).float())
    masks_p, masks_t = region_masks(pred, "multiclass").bool().numpy(), region_masks(target, "multiclass").bool().numpy()
    expected = np.array([[dice(masks_p[b, r], masks_t[b, r]) for r in range(3)] for b in range(6)])
    assert np.allclose(ours.numpy(), expected) and (ours[0] == 1).all()
