"""Image decoding and the train/eval transforms of the data stream.

``paper`` is the authors' training augmentation (SPEC-clustercam.md b.1) built with timm's
``create_transform``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip ->
RandAugment ``rand-m9-mstd0.5-inc1`` -> ImageNet normalisation -> RandomErasing (p 0.25, pixel mode).
``light`` keeps the crop and flip but drops RandAugment and erasing, and lets libjpeg decode at a
reduced scale (DCT scaling) when the image is much larger than the crop: much cheaper per image.
``none`` is a deterministic resize to S x S (bilinear), used for validation and tests; masks get
the same geometry with nearest-neighbour sampling so pixels stay aligned with the image.

``light`` and ``none`` keep pixels as uint8 until the batch reaches the consuming process, where
``finish`` converts and normalises it in one pass: a float batch costs 4x the bytes to hand from a
DataLoader worker to the trainer, and that copy into fresh shared memory cost more CPU than the
decode itself. ``paper`` must normalise per image (RandomErasing draws its noise in normalised space)
and ships float batches.

Pillow >= 12 refuses ``posterize(img, 0)``, which timm's PosterizeIncreasing produces at the top
of its magnitude range (magnitude 9 + noise reaches 10 -> 0 bits): without a fix one image in a few
hundred would crash a training run. Zero bits used to give a black image (the authors' Pillow), and
``paper`` keeps that.

Public API::

    IMAGENET_MEAN, IMAGENET_STD
    decode_rgb(data, draft_size=None) -> PIL.Image (RGB; alpha composited on the ImageNet mean grey)
    ImageTransform(kind, size): t(image) -> per-image item;  t.collate(items) -> batch (in the worker);
                                t.finish(batch) -> (B, 3, S, S) float32 normalised (in the consumer)
    resize_mask(mask, size) -> (S, S) uint8 array (nearest)
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
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


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the old Pillow meaning of 0 bits (black) instead of a ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


_INV_STD_255 = 1 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
_SHIFT = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255 * _INV_STD_255


def _paper_transform(size: int):
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    transform = create_transform(
        input_size=size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
        color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=0.25, re_mode="pixel", re_count=1,
    )
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
    return transform


class ImageTransform:
    def __init__(self, kind: Augment, size: int):
        if kind not in ("paper", "light", "none"):
            raise ValueError(f"augment must be paper, light or none, got {kind!r}")
        self.kind, self.size = kind, size
        if kind == "paper":
            self.pipeline = _paper_transform(size)
        elif kind == "light":
            self.pipeline = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BILINEAR),
                                    T.RandomHorizontalFlip()])
        else:
            self.pipeline = lambda image: image.resize((size, size), Image.BILINEAR)

    @property
    def random(self) -> bool:
        return self.kind != "none"

    def __call__(self, image: Image.Image):
        out = self.pipeline(image)
        return out if self.kind == "paper" else np.asarray(out, dtype=np.uint8)

    def collate(self, items: list) -> torch.Tensor:
        if self.kind == "paper":
            return torch.stack(items)
        return torch.from_numpy(np.ascontiguousarray(np.stack(items).transpose(0, 3, 1, 2)))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch
        return (batch * _INV_STD_255).sub_(_SHIFT)  # uint8 -> float32 and scale in one pass


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST), dtype=np.uint8)
