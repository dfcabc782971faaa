"""Image decoding and the train/eval transforms of the data stream.

``paper`` is the authors' training augmentation (SPEC-clustercam.md b.1) built with timm's
``create_transform``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip ->
RandAugment ``rand-m9-mstd0.5-inc1`` -> ImageNet normalisation -> RandomErasing (p 0.25, pixel mode).
``light`` keeps the crop and flip but drops RandAugment and erasing, and lets libjpeg decode at a
reduced scale (DCT scaling) when the image is much larger than the crop: much cheaper per image.
``none`` is a deterministic resize to S x S, used for validation and tests; masks get the same
geometry with nearest-neighbour sampling so pixels stay aligned with the image.

Public API::

    IMAGENET_MEAN, IMAGENET_STD
    decode_rgb(data, draft_size=None) -> PIL.Image (RGB; alpha composited on the ImageNet mean grey)
    build_transform(kind, size) -> callable(PIL.Image) -> (3, S, S) float tensor
    resize_mask(mask, size) -> (S, S) uint8 array (nearest)
"""

from __future__ import annotations

import io
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_GREY = tuple(round(255 * m) for m in IMAGENET_MEAN)

Augment = Literal["paper", "light", "none"]


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _MEAN_GREY + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def build_transform(kind: Augment, size: int) -> Callable[[Image.Image], torch.Tensor]:
    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if kind == "paper":
        from timm.data import create_transform

        return create_transform(
            input_size=size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
            color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=0.25, re_mode="pixel", re_count=1,
        )
    if kind == "light":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BILINEAR),
                          T.RandomHorizontalFlip(), *normalise])
    if kind == "none":
        return T.Compose([T.Resize((size, size), interpolation=InterpolationMode.BICUBIC), *normalise])
    raise ValueError(f"augment must be paper, light or none, got {kind!r}")


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST), dtype=np.uint8)
