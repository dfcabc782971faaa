"""The single-stage objective (docs/method.md §b.3 steps 4-5, §b.8).

The segmentation loss is written as sums and pixel counts so a distributed trainer can all-reduce
the counts and weight every pixel of the global batch equally, as the authors' single-process
DataParallel run does (docs/method.md §e.19); with one process the two forms are the same number.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from system.refine import IGNORE_INDEX

SEG_LOSS_WEIGHT = 0.1


class SegLossTerms(NamedTuple):
    bg_sum: torch.Tensor  # summed cross-entropy over background pixels
    bg_count: torch.Tensor  # number of background pixels
    fg_sum: torch.Tensor
    fg_count: torch.Tensor


class Losses(NamedTuple):
    total: torch.Tensor
    cls: torch.Tensor
    pat: torch.Tensor
    seg: torch.Tensor | None


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MultiLabelSoftMargin: per-class BCE-with-logits, mean over classes and batch."""
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def seg_loss_terms(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> SegLossTerms:
    """Cross-entropy sums and counts over background (label 0) and foreground (1..K) pixels.

    ``logits`` (B,K+1,H,W) must already be at the labels' resolution.
    """
    labels = labels.long()
    valid = labels != ignore_index
    nll = F.cross_entropy(logits.float(), labels.masked_fill(~valid, 0), reduction="none")
    bg = valid & (labels == 0)
    fg = valid & (labels != 0)
    return SegLossTerms(
        (nll * bg).sum(), bg.sum().to(nll.dtype), (nll * fg).sum(), fg.sum().to(nll.dtype)
    )


def seg_loss_from_terms(terms: SegLossTerms) -> torch.Tensor:
    """0.5 * (mean background CE + mean foreground CE); a side with no pixels contributes 0."""
    bg = torch.where(terms.bg_count > 0, terms.bg_sum / terms.bg_count.clamp_min(1), terms.bg_sum * 0)
    fg = torch.where(terms.fg_count > 0, terms.fg_sum / terms.fg_count.clamp_min(1), terms.fg_sum * 0)
    return 0.5 * (bg + fg)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return seg_loss_from_terms(seg_loss_terms(logits, labels, ignore_index))


def upsample_segs(segs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(segs, size, mode="bilinear", align_corners=False)


def clustercam_loss(
    cls_logits: torch.Tensor,
    pat_logits: torch.Tensor,
    labels: torch.Tensor,
    segs: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    seg_weight: float = SEG_LOSS_WEIGHT,
) -> Losses:
    """L = L_cls + L_pat (+ 0.1 L_seg once pseudo labels exist); ``segs`` at decoder resolution."""
    cls = multilabel_loss(cls_logits, labels)
    pat = multilabel_loss(pat_logits, labels)
    if segs is None or pseudo is None:
        return Losses(cls + pat, cls, pat, None)
    seg = seg_loss(upsample_segs(segs, tuple(pseudo.shape[-2:])), pseudo)
    return Losses(cls + pat + seg_weight * seg, cls, pat, seg)
