"""Multi-scale CAMs for training and multi-scale segmentation probabilities (docs/method.md §b.4, §c.1).

Flips are batched with the originals (one forward per scale at 2B); scales cannot share a forward
because the token grids differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from system.model.network import CAM_LAYERS, CAM_P2P_REFINE, ClusterCAM

TRAIN_CAM_SCALES = (1.0, 0.75, 1.25)
INFER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return int(height * scale), int(width * scale)


@torch.no_grad()
def multi_scale_cam(
    model: ClusterCAM,
    x: torch.Tensor,
    scales: Sequence[float] = TRAIN_CAM_SCALES,
    n_layers: int = CAM_LAYERS,
    p2p_refine: bool = CAM_P2P_REFINE,
) -> torch.Tensor:
    """Training-time CAMs (B,K,H,W) in [0,1): max over flips, sum over scales, min-max per map.

    Scale 1.0 always runs (first); the model's mode is the caller's (the authors use train mode).
    ``n_layers`` and ``p2p_refine`` are ``model.cam``'s (docs/method.md §a.7).
    """
    B, _, H, W = x.shape
    total = None
    for scale in (1.0, *[s for s in scales if s != 1.0]):
        xs = x if scale == 1.0 else F.interpolate(x, _scaled_size(H, W, scale), mode="bilinear", align_corners=False)
        cam = model.cam(torch.cat([xs, xs.flip(-1)], dim=0), n_layers, p2p_refine).float()
        cam = F.interpolate(cam, (H, W), mode="bilinear", align_corners=False)
        cam = F.relu(torch.maximum(cam[:B], cam[B:].flip(-1)))
        total = cam if total is None else total + cam
    total = total - total.amin(dim=(2, 3), keepdim=True)
    return total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)


@torch.no_grad()
def predict_probs(model: ClusterCAM, x: torch.Tensor, scales: Sequence[float] = INFER_SCALES) -> torch.Tensor:
    """Test-time probabilities (B,K+1,H,W): element-wise max over scales of the decoder's softmax."""
    B, _, H, W = x.shape
    probs = None
    for scale in scales:
        xs = F.interpolate(x, _scaled_size(H, W, scale), mode="bilinear", align_corners=True)
        segs = F.interpolate(model.segment(xs).float(), (H, W), mode="bilinear", align_corners=False)
        p = segs.softmax(dim=1)
        probs = p if probs is None else torch.maximum(probs, p)
    # the authors start from zeros; max with 0 is a no-op on probabilities
    return probs
