"""The single-stage objective (docs/method.md §b.3 steps 4-5, §b.8): the one loss that training,
tests and benchmarks all compute.

The segmentation loss is written as sums and pixel counts, and ``clustercam_loss`` takes the counts
summed over the ranks that share a global batch (``Ranks``): every pixel of the global batch then
weighs the same, as in the authors' single-process DataParallel run (docs/method.md §e.19). With one
process (``ONE_PROCESS``) the two forms are the same number.

Partial labels (OpenImages; docs/method.md §b.5): ``known`` (B,K) marks the classes whose label is known per image, a
positive or a verified negative. An unknown class is neither: it adds nothing to either
classification loss (its term is masked out, so its logit gets exactly zero gradient) and each
image's loss is the mean over its known classes. Treating unknowns as negatives would teach the
classifier that every unverified object is absent, and suppress the CAMs of exactly those objects.
Without ``known`` every class is known and the loss is the authors' MultiLabelSoftMargin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from system.refine import IGNORE_INDEX

SEG_LOSS_WEIGHT = 0.1


class SegLossTerms(NamedTuple):
    bg_sum: torch.Tensor  # summed cross-entropy over background pixels
    bg_count: torch.Tensor  # number of background pixels
    fg_sum: torch.Tensor
    fg_count: torch.Tensor


class Losses(NamedTuple):
    total: torch.Tensor  # what to backpropagate on this rank
    cls: torch.Tensor  # this rank's classification losses (detached, for reporting)
    pat: torch.Tensor
    seg: torch.Tensor | None  # the global batch's segmentation loss (detached); None before the seg phase


def _local_sum(t: torch.Tensor) -> torch.Tensor:
    return t


def _process_group_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The ranks that share a global batch: how many, and the sum of a tensor over them."""

    size: int = 1
    sum: Callable[[torch.Tensor], torch.Tensor] = _local_sum

    @classmethod
    def of_process_group(cls) -> Ranks:
        """The default torch.distributed group, or one process when none is initialised."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_world_size(), _process_group_sum)
        return ONE_PROCESS


ONE_PROCESS = Ranks()


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """MultiLabelSoftMargin: per-class BCE-with-logits, mean over classes and batch; with ``known``,
    mean over each image's known classes only (an image with none adds 0)."""
    if known is None:
        return F.multilabel_soft_margin_loss(logits.float(), labels.float())
    per_class = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    mask = known.to(per_class.dtype)
    per_image = (per_class * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_image.mean()


def seg_loss_terms(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> SegLossTerms:
    """Cross-entropy sums and counts over background (label 0) and foreground (1..K) pixels.

    ``logits`` (B,K+1,H,W) must already be at the labels' resolution.
    """
    labels = labels.long()
    valid = labels != ignore_index
    nll = F.cross_entropy(logits.float(), labels.masked_fill(~valid, 0), reduction="none")
    bg = valid & (labels == 0)
    fg = valid & (labels != 0)
    return SegLossTerms((nll * bg).sum(), bg.sum().to(nll.dtype), (nll * fg).sum(), fg.sum().to(nll.dtype))


def seg_loss_from_terms(terms: SegLossTerms, bg_count: torch.Tensor, fg_count: torch.Tensor) -> torch.Tensor:
    """0.5 * (bg CE sum / bg count + fg CE sum / fg count); a side with no pixels adds 0.

    The counts are the global batch's (summed over ranks), so this rank's share of the loss sums
    over ranks to the global batch's loss.
    """
    return 0.5 * (terms.bg_sum / bg_count.clamp_min(1) + terms.fg_sum / fg_count.clamp_min(1))


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The segmentation loss of one batch on its own (one process)."""
    terms = seg_loss_terms(logits, labels, ignore_index)
    return seg_loss_from_terms(terms, terms.bg_count, terms.fg_count)


def upsample_segs(segs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(segs, size, mode="bilinear", align_corners=False)


def clustercam_loss(
    cls_logits: torch.Tensor,
    pat_logits: torch.Tensor,
    labels: torch.Tensor,
    segs: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    seg_weight: float = SEG_LOSS_WEIGHT,
    ranks: Ranks = ONE_PROCESS,
    known: torch.Tensor | None = None,
) -> Losses:
    """L = L_cls + L_pat (+ ``seg_weight`` L_seg once pseudo labels exist); ``segs`` at decoder resolution.

    The pixel counts are summed over ``ranks`` before they divide, and the factor ``ranks.size`` on
    this rank's segmentation term undoes the gradient averaging of data parallelism. ``known``: the
    partial-label mask (None: every class known).
    """
    cls = multilabel_loss(cls_logits, labels, known)
    pat = multilabel_loss(pat_logits, labels, known)
    if segs is None or pseudo is None:
        return Losses(cls + pat, cls.detach(), pat.detach(), None)
    terms = seg_loss_terms(upsample_segs(segs, tuple(pseudo.shape[-2:])), pseudo)
    counts = ranks.sum(torch.stack([terms.bg_count, terms.fg_count]).detach())
    local = seg_loss_from_terms(terms, counts[0], counts[1])
    total = cls + pat + seg_weight * ranks.size * local
    return Losses(total, cls.detach(), pat.detach(), ranks.sum(local.detach()))


class StepLossMean:
    """The losses a step reports: the mean over its micro-batches and over the ranks.

    ``cls`` and ``pat`` are per rank and averaged over ``ranks``; ``seg`` is already the global
    batch's. Every rank reports the same numbers.
    """

    def __init__(self, seg_weight: float, ranks: Ranks = ONE_PROCESS):
        self.seg_weight, self.ranks = seg_weight, ranks
        self.parts: list[torch.Tensor] = []
        self.segs: list[float] = []

    def add(self, losses: Losses) -> None:
        self.parts.append(torch.stack([losses.cls, losses.pat]).detach().float())
        if losses.seg is not None:
            self.segs.append(float(losses.seg))

    def result(self) -> dict[str, float | None]:
        if not self.parts:
            raise ValueError("no micro-batch losses were added to the step")
        parts = torch.stack(self.parts).mean(dim=0)
        if self.ranks.size > 1:
            parts = self.ranks.sum(parts) / self.ranks.size
        cls, pat = parts.tolist()
        seg = sum(self.segs) / len(self.segs) if self.segs else None
        total = cls + pat + (self.seg_weight * seg if seg is not None else 0.0)
        return {"loss": total, "loss_cls": cls, "loss_pat": pat, "loss_seg": seg}
