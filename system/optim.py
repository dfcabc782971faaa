"""Optimiser parameter groups and learning-rate schedules (docs/method.md §b.9).

Two LR recipes:

* ``authors``: exactly what the reference run did (tests/golden/lr_schedule.json): base LR
  ``5e-4 * global_batch / 512``, timm's per-epoch cosine with 5 warm-up epochs from 1e-6 towards
  ``lr_min`` 1e-5, stepped *after* each epoch (so epochs 0 and 1 both train at 1e-6) and, because
  the base LR is below ``lr_min``, "decaying" upwards. Use it to reproduce the paper.
* ``scaled``: what to use for many workers. Linear scaling on the global batch,
  ``lr = lr_per_512 * global_batch / 512`` (global batch = workers x micro batch x accumulation),
  linear warm-up per *step* over ``warmup_epochs``, then a cosine per step down to
  ``min_lr_ratio * lr``. It fixes the inverted cosine and the coarse per-epoch steps, which matter
  when one epoch is only a few dozen steps on a large cluster.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from system.config import option

AUTHORS_LR_PER_512 = 5e-4


@dataclasses.dataclass
class OptimConfig:
    lr_schedule: Literal["authors", "scaled"] = option(
        "authors", "'authors' reproduces the reference's per-epoch LR exactly; 'scaled' is per-step warm-up + cosine"
    )
    lr_per_512: float = option(AUTHORS_LR_PER_512, "learning rate for a global batch of 512 (linear scaling rule)")
    warmup_epochs: float = option(5.0, "warm-up length in epochs")
    warmup_lr: float = option(1e-6, "learning rate at the start of warm-up")
    lr_min: float = option(1e-5, "authors: timm's lr_min; scaled: ignored (see min_lr_ratio)")
    min_lr_ratio: float = option(0.01, "scaled: final learning rate as a fraction of the peak")
    weight_decay: float = option(
        0.05, "AdamW weight decay on tensors with >= 2 dims (cls_token and pos_embed included, as the authors)"
    )
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    eps: float = option(1e-8, "AdamW eps")
    grad_clip: float = option(0.0, "gradient-norm clipping; 0 = none (the authors clip nothing)")


DECODER_GROUP = "decoder"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every tensor with >= 2 dims, none of the biases, norms and mix parameters.

    The authors' DataParallel wrapper hid the model's no-weight-decay list, so cls_token and
    pos_embed are decayed too (docs/method.md §e.14); this reproduces that. The segmentation decoder gets a
    group of its own: it receives no gradient in the classification phase, where torch's AdamW
    skips it, while a ZeRO optimizer steps its flat partitions every iteration with a zero
    gradient. Switching the group's weight decay off until the segmentation phase
    (``set_step_hyperparams``) keeps the decoder's weights where the authors' run keeps them.
    """
    decay, no_decay, decoder = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("decoder."):
            decoder.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": decoder, "weight_decay": weight_decay, "name": DECODER_GROUP, "base_weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def set_step_hyperparams(optimizer: torch.optim.Optimizer, lr: float, seg_phase: bool) -> None:
    """This step's learning rate, and the decoder's weight decay only once it is trained."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") == DECODER_GROUP:
            group["weight_decay"] = group["base_weight_decay"] if seg_phase else 0.0


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr_per_512 * global_batch / 512


def authors_epoch_lr(t: int, base: float, epochs: int, cfg: OptimConfig) -> float:
    """timm 0.4.12 CosineLRScheduler(t_initial=epochs, warmup_t, warmup_lr_init, lr_min) at epoch t."""
    if t < cfg.warmup_epochs:
        return cfg.warmup_lr + t * (base - cfg.warmup_lr) / cfg.warmup_epochs
    return cfg.lr_min + 0.5 * (base - cfg.lr_min) * (1 + math.cos(math.pi * t / epochs))


def learning_rate(cfg: OptimConfig, global_batch: int, epochs: int, steps_per_epoch: int, step: int) -> float:
    """Learning rate for global optimizer ``step`` (0-based)."""
    base = base_lr(cfg, global_batch)
    epoch = step // steps_per_epoch
    if cfg.lr_schedule == "authors":
        # scheduler.step(epoch) runs after each epoch: epoch e trains with lr(e - 1), epoch 0 with lr(0)
        return authors_epoch_lr(max(epoch - 1, 0), base, epochs, cfg)
    total = epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_lr + (base - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = base * cfg.min_lr_ratio
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def adamw(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """torch's AdamW with the authors' groups; fused where torch has it for the device.

    The fused kernel updates all tensors in one pass without the foreach path's temporary copies
    of every parameter, which is most of a CPU step's transient memory.
    """
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
