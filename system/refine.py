"""Pixel-adaptive refinement (PAR) and CAM -> pseudo-label construction (docs/method.md §b.5-b.7).

The authors refine one image at a time over the channels of its present classes. Here the batch,
both background thresholds and the present classes are refined in one PAR call: absent classes are
dropped by compacting each image's present channels to the front (padding with zero planes, which
PAR keeps at exactly zero and argmax therefore never picks), so the result is the same labels at a
fraction of the work when K is large (COCO's 80 classes, 1-3 present).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from system.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported

# the authors' literal 0-255 constants (products rounded in decimal, not in float32)
_MEAN_255 = (123.675, 116.28, 103.53)
_STD_255 = (58.395, 57.12, 57.375)
PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
PAR_ITERS = 10
IGNORE_INDEX = 255

# (row, col) offset directions of the 8 neighbours, in the authors' order
_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> [0,1], through uint8 as the authors do (truncation).

    Values are clamped to [0,255] before the cast (docs/method.md §e.15): the authors' cast wraps around for
    out-of-range pixels that RandomErasing's noise produces; in range the result is identical.
    """
    mean = torch.tensor(_MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD_255, device=images.device).view(1, 3, 1, 1)
    pixels = (images.float() * std + mean).clamp_(0, 255)
    return pixels.to(torch.uint8).float() / 255


class PAR:
    """Pixel-adaptive refinement with a kernel from colour and position affinities.

    ``refine(images, masks)``: images (B,3,h,w), masks (B,Ch,h,w) at the same size, propagated
    ``num_iter`` times over the 8 neighbours at each dilation.
    """

    def __init__(
        self, dilations: Sequence[int] = PAR_DILATIONS, num_iter: int = PAR_ITERS, w1: float = 0.3, w2: float = 0.01
    ):
        self.dilations = tuple(dilations)
        self.num_iter = num_iter
        self.w1 = w1
        self.w2 = w2
        self.pad = max(self.dilations)
        self.offsets = [(d * dr, d * dc) for d in self.dilations for dr, dc in _DIRECTIONS]
        dist = torch.tensor([math.hypot(dr, dc) for dr, dc in self.offsets], dtype=torch.float32)
        pos = -((dist / (dist.std() + 1e-5) / w1) ** 2)
        self.pos_weight = w2 * pos.softmax(dim=0)

    def _neighbours(self, padded: torch.Tensor, h: int, w: int):
        p = self.pad
        for dr, dc in self.offsets:
            yield padded[..., p + dr : p + dr + h, p + dc : p + dc + w]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # replicate padding by the largest dilation = clamped indexing for every smaller one
        return F.pad(x, [self.pad] * 4, mode="replicate")

    def kernel(self, images: torch.Tensor) -> torch.Tensor:
        """(B,n,h,w) propagation weights, n = 8 * len(dilations)."""
        B, _, h, w = images.shape
        neigh = torch.stack(list(self._neighbours(self._pad(images), h, w)), dim=2)  # (B,3,n,h,w)
        diff = (neigh - images.unsqueeze(2)).abs()
        std = neigh.std(dim=2, keepdim=True)
        aff = (-((diff / (std + 1e-5) / self.w1) ** 2)).mean(dim=1)  # (B,n,h,w)
        return aff.softmax(dim=1) + self.pos_weight.to(aff).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if masks.shape[-2:] != images.shape[-2:]:
            masks = F.interpolate(masks, images.shape[-2:], mode="bilinear", align_corners=True)
        B, _, h, w = images.shape
        weights = self.kernel(images.float()).unsqueeze(1)  # (B,1,n,h,w)
        masks = masks.float()
        for _ in range(self.num_iter):
            out = torch.zeros_like(masks)
            for i, neigh in enumerate(self._neighbours(self._pad(masks), h, w)):
                out.addcmul_(neigh, weights[:, :, i])
            masks = out
        return masks


def cam_to_label(cams: torch.Tensor, cls_labels: torch.Tensor) -> torch.Tensor:
    """CAMs of the image's tagged classes only (docs/method.md §b.5); the authors' hard label is unused."""
    return cams * cls_labels.to(cams.dtype).view(*cls_labels.shape, 1, 1)


def _present_channels(cls_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the channel indices of [background ; present classes] packed to the front.

    Returns ``index`` (B,P) into the K+1 channels and ``valid`` (B,P) telling real from padding;
    P = 1 + the largest number of present classes in the batch.
    """
    present = torch.cat([torch.ones_like(cls_labels[:, :1], dtype=torch.bool), cls_labels != 0], dim=1)
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
    P = int(present.sum(dim=1).max())
    index = order[:, :P]
    return index, torch.gather(present, 1, index)


@torch.no_grad()
def refine_with_background(
    images01: torch.Tensor,
    cams: torch.Tensor,
    cls_labels: torch.Tensor,
    thresholds: Sequence[float],
    par: PAR | None = None,
    down_scale: int = 2,
) -> list[torch.Tensor]:
    """For each background threshold, the PAR-refined argmax label (B,H,W) in {0..K}.

    ``cams`` (B,K,H,W) are label-masked CAMs; a constant background plane of the threshold is put
    in front, the present channels are softmaxed at 1/down_scale resolution, refined, upsampled.
    """
    par = par or PAR()
    B, K, H, W = cams.shape
    small = (H // down_scale, W // down_scale)
    images_small = F.interpolate(images01.float(), small, mode="bilinear", align_corners=False)
    index, valid = _present_channels(cls_labels)
    P = index.shape[1]
    cams_small = F.interpolate(cams.float(), small, mode="bilinear", align_corners=False)
    packed = []
    for t in thresholds:
        # resizing a constant plane gives the constant, so the background is added after resizing
        planes = torch.cat([torch.full_like(cams_small[:, :1], t), cams_small], dim=1)
        sel = torch.gather(planes, 1, index.view(B, P, 1, 1).expand(B, P, *small))
        sel = sel.masked_fill(~valid.view(B, P, 1, 1), float("-inf"))
        packed.append(sel.softmax(dim=1))
    refined = par(images_small, torch.cat(packed, dim=1))
    refined = F.interpolate(refined, (H, W), mode="bilinear", align_corners=False)
    labels = []
    for i in range(len(thresholds)):
        arg = refined[:, i * P : (i + 1) * P].argmax(dim=1)
        labels.append(torch.gather(index, 1, arg.flatten(1)).view(B, H, W))
    return labels


@torch.no_grad()
def pseudo_labels(
    images01: torch.Tensor,
    cams: torch.Tensor,
    cls_labels: torch.Tensor,
    bg_threshold: float = 0.4,
    ignore_delta: float = 0.1,
    par: PAR | None = None,
    unverified: torch.Tensor | None = None,
) -> torch.Tensor:
    """PAR-refined pseudo labels (B,H,W) int64 in {0..K, 255} (docs/method.md §b.6-b.7).

    Foreground where a class beats the ``bg_threshold + ignore_delta`` background; background only
    where the background wins even at ``bg_threshold - ignore_delta``; 255 in between.

    ``unverified`` (B,K), partial labels: classes whose label is unknown but which the classifier
    finds present. They are never foreground (not tags), but neither is their object background: a
    pixel that would be background where such a class's CAM passes the low threshold is ignored, so
    the segmentation head is not taught that an unverified object is absent.
    """
    valid = cam_to_label(cams, cls_labels)
    high, low = refine_with_background(
        images01, valid, cls_labels, (bg_threshold + ignore_delta, bg_threshold - ignore_delta), par
    )
    labels = high.masked_fill(high == 0, IGNORE_INDEX)
    background = (high == 0) & (low == 0)
    if unverified is not None:
        background &= cam_to_label(cams, unverified).amax(dim=1) < bg_threshold - ignore_delta
    return labels.masked_fill(background, 0)
