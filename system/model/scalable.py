"""The scalable head (``model.head: scalable``, docs/method.md §a.8): ClusterCAM for large vocabularies.

Why: in the authors' network every class is a token that runs through all L blocks, and every block,
head and class adds one attention map to FEAT, the input of the head and of the LargeFOV decoder.
FEAT is C + L·h·K channels wide (43,584 at K = 600), so the head and the decoder's first convolution
grow with K·(K + D), and the K class tokens make the backbone itself grow with K (at 224 px and
K = 600 there are three class tokens per patch). Neither can be fixed after the fact: reducing each
class's L·h maps with shared weights still needs the K class tokens that produce them.

Design: class identity moves out of the backbone and into class embeddings that score shared
features.

* The backbone is the authors' (clustering blocks, DeiT initialisation) but carries ``head_tokens`` = T
  shared learned tokens instead of K class tokens (T = 1 by default: a DeiT with its own class token).
* FEAT is built exactly as the authors build it, from those T tokens: patch features plus one
  token->patch attention map per block and head, C + L·h·T channels, whatever K is. The attention
  maps are class-agnostic saliency cues, reduced by the first convolutions with weights every class
  shares.
* ``head``: the authors' 3x3 convolution FEAT -> K. Each output channel is a class embedding scored
  against every patch's FEAT vector, so ``pat_logits`` (its global average) and the CAM
  (ReLU(FEAT * head.weight), docs/method.md §a.7) keep their meaning.
* ``cls_logits``: ``cls_head``, a linear layer C -> K on the mean of the T final tokens (the authors'
  channel mean of a per-class token has no per-class token to read here).
* CAM gate: the tokens' attention maps (head mean, last ``n_layers`` summed) averaged over the T
  tokens, the same for every class; class selectivity comes from the head and from the image's labels,
  which every CAM consumer applies.
* ``segs``: the authors' LargeFOV on FEAT; only its last 1x1 convolution (D -> K+1) depends on K.

Forward FLOPs per image, counting a multiply-add as 2, with N = r·c patches, P = C + L·h·T the
FEAT width and D the decoder width:

    2·[ backbone(N + T tokens) + 9·P·K·N + 9·P·D·N + 9·D²·N + D·(K+1)·N + C·K ]

The K-dependent part is K·(9·P·N + D·N + C), linear in K with a coefficient that does not contain
K; the authors' is backbone(N + K tokens) + 9·(C + L·h·K)·(K + D)·N, quadratic in K.
``python -m benchmarks.vocab`` counts both.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from system.model.config import ClusterCAMConfig
from system.model.network import ClusterCAM, Features


class ScalableClusterCAM(ClusterCAM):
    """ClusterCAM carrying ``cfg.head_tokens`` shared tokens; the classes live in ``head`` and ``cls_head``."""

    def __init__(self, cfg: ClusterCAMConfig):
        super().__init__(cfg)
        self.cls_head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        trunc_normal_(self.cls_head.weight, std=0.02)
        nn.init.zeros_(self.cls_head.bias)

    def class_logits(self, feats: Features) -> torch.Tensor:
        return self.cls_head(feats.x_cls.mean(dim=1))

    def cam_gate(self, feats: Features, n_layers: int) -> torch.Tensor:
        """(B,1,N): the shared tokens' attention, the same gate for every class."""
        return feats.c2p[:, -n_layers:].mean(dim=2).sum(dim=1).mean(dim=1, keepdim=True)
