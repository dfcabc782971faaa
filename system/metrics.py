"""Confusion-matrix segmentation metrics (docs/method.md §c.3), accumulable over batches and mergeable.

Workers each accumulate a matrix and the trainer sums them (all-reduce of ``matrix``), so the mIoU
of a distributed evaluation is exactly that of one pass over all pixels.
"""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction. GT outside [0, n) (255 = ignore) is skipped.

    A prediction outside [0, n) (e.g. a pseudo label's 255) counts as a miss for its GT class: it
    adds to the GT row but to no column (the authors' evaluator would crash on it).
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.float64)
        self.missed = np.zeros(num_classes, dtype=np.float64)

    def add(self, gt, pred) -> ConfusionMatrix:
        gt = _as_int_array(gt)
        pred = _as_int_array(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        n = self.num_classes
        keep = (gt >= 0) & (gt < n)
        gt, pred = gt[keep], pred[keep]
        inside = (pred >= 0) & (pred < n)
        self.matrix += np.bincount(n * gt[inside] + pred[inside], minlength=n * n).reshape(n, n)
        self.missed += np.bincount(gt[~inside], minlength=n)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class and {self.num_classes}-class matrices")
        self.matrix += other.matrix
        self.missed += other.missed
        return self

    def state(self) -> torch.Tensor:
        """(n, n+1) float64 tensor: the matrix and the missed column, for all-reduce or saving."""
        return torch.from_numpy(np.concatenate([self.matrix, self.missed[:, None]], axis=1))

    @classmethod
    def from_state(cls, state: torch.Tensor) -> ConfusionMatrix:
        state = state.detach().cpu().double().numpy()
        cm = cls(state.shape[0])
        cm.matrix = state[:, :-1].copy()
        cm.missed = state[:, -1].copy()
        return cm

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        diag = np.diag(self.matrix)
        union = self.matrix.sum(axis=1) + self.missed + self.matrix.sum(axis=0) - diag
        with np.errstate(divide="ignore", invalid="ignore"):
            return diag / union

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum() + self.missed.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self, class_names: list[str] | None = None) -> dict:
        iou = self.iou()
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        }


def _as_int_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64, copy=False).ravel()
