"""Confusion-matrix mIoU: accumulation, merging across workers, ignore handling."""

from __future__ import annotations

import numpy as np
import pytest

from system.metrics import ConfusionMatrix


def test_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (8, 9)) for _ in range(6)]
    preds = [rng.integers(0, 4, (8, 9)) for _ in range(6)]
    gts[0][0, :] = 255
    whole = ConfusionMatrix(4)
    for g, p in zip(gts, preds):
        whole.add(g, p)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    for i, (g, p) in enumerate(zip(gts, preds)):
        (a if i % 2 else b).add(g, p)
    merged = ConfusionMatrix.from_state(a.state() + b.state())
    assert np.array_equal(merged.matrix, whole.matrix)
    assert merged.miou() == whole.miou() == a.merge(b).miou()
    assert whole.matrix.sum() == 6 * 72 - 9


def test_ignored_gt_and_invalid_predictions():
    gt = np.array([[0, 1, 255], [1, 1, 0]])
    pred = np.array([[0, 255, 1], [1, 1, 0]])
    cm = ConfusionMatrix(2).add(gt, pred)
    # the gt-1 pixel predicted 255 is a miss; the gt-255 pixel is skipped
    assert cm.iou() == pytest.approx([1.0, 2 / 3])
    assert cm.pixel_accuracy() == pytest.approx(4 / 5)
    absent = ConfusionMatrix(3).add(gt, pred)
    assert np.isnan(absent.iou()[2]) and absent.miou() == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="differ in shape"):
        cm.add(gt, pred[:1])
    summary = cm.summary(["background", "cat"])
    assert summary["iou"]["cat"] == pytest.approx(2 / 3)
