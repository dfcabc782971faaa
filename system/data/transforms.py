"""Image decoding and the train/eval transforms of the data stream.

``paper`` is the authors' training augmentation (docs/method.md §b.1) built with timm's
``create_transform``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip ->
RandAugment ``rand-m9-mstd0.5-inc1`` -> ImageNet normalisation -> RandomErasing (p 0.25, pixel mode).
``light`` keeps the crop and flip but drops RandAugment and erasing, and lets libjpeg decode at a
reduced scale (DCT scaling) when the image is much larger than the crop: much cheaper per image. It
draws torchvision's RandomResizedCrop parameters from its own ``random.Random(seed)``, where
torchvision would draw from torch's global RNG (which then has to be saved, seeded and restored
around every sample). ``none`` is a deterministic resize to S x S (bilinear), used for validation
and tests; masks get the same geometry with nearest-neighbour sampling so pixels stay aligned with
the image. Both resize with torch's vectorised uint8 kernel (antialiased bilinear, within one grey
level of PIL's): PIL's resize cost more than the JPEG decode, torch's costs a third of PIL's.

``light`` and ``none`` keep pixels as uint8, in Pillow's (B, S, S, 4) RGBX layout, until the batch
reaches the consuming process, where ``finish`` transposes, converts and normalises it (on the
training device when given one): a float batch costs 4x the bytes to hand from a DataLoader worker
to the trainer (and over PCIe), and that copy into shared memory cost more CPU than the decode
itself; transposing in the worker would be one more full copy of the batch. ``paper`` must
normalise per image (RandomErasing draws its noise in normalised space) and ships float batches.

Pillow >= 12 refuses ``posterize(img, 0)``, which timm's PosterizeIncreasing produces at the top
of its magnitude range (magnitude 9 + noise reaches 10 -> 0 bits): without a fix one image in a few
hundred would crash a training run. Zero bits used to give a black image (the authors' Pillow), and
``paper`` keeps that.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from system.data.convert import Normalised, needs_work, normalise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_GREY = tuple(round(255 * m) for m in IMAGENET_MEAN)

Augment = Literal["paper", "light", "none"]


def decode_normalised(data: bytes, draft_size: int | None = None, upright: bool = False) -> Normalised:
    """The decoded image in a mode ``to_rgb`` shows correctly (``system.data.convert``), turned by its
    EXIF orientation when ``upright``. Shards hold upright images already, so the training stream
    leaves orientation alone; the labeller reads a manifest's files as they are and turns them."""
    image = Image.open(io.BytesIO(data))
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    if needs_work(image, upright):
        return normalise(image, upright)
    image.load()
    return Normalised(image, (), 1, image.size)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of a kept-mode image; transparency is composed over the ImageNet mean grey."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _MEAN_GREY + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    return to_rgb(decode_normalised(data, draft_size).image)


def rgbx_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as an (H, W, 4) uint8 tensor, the fourth byte padding: Pillow stores RGB pixels in
    4 bytes, so RGBX comes out with a plain copy where packed RGB costs a per-pixel repack."""
    data = bytearray(image.tobytes("raw", "RGBX"))
    return torch.frombuffer(data, dtype=torch.uint8).view(image.height, image.width, 4)


def resize_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, C) uint8 -> (size, size, C) uint8, antialiased bilinear like PIL's BILINEAR resize (within
    1 level), with torch's vectorised uint8 kernel, which is faster than PIL's."""
    image = image.contiguous()
    height, width, channels = image.shape
    # a (1, C, H, W) view of the HWC memory whose batch stride says "channels last" unambiguously, so
    # torch picks its vectorised kernel and returns channels-last memory (torchvision's resize does
    # the same, with more Python overhead)
    planar = image.as_strided((1, channels, height, width), (height * width * channels, 1, width * channels, channels))
    out = torch.nn.functional.interpolate(
        planar, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0].permute(1, 2, 0)


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the old Pillow meaning of 0 bits (black) instead of a ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


_INV_STD_255 = 1 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
_SHIFT = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255 * _INV_STD_255


def _paper_transform(size: int, crop_scale: tuple[float, float]):
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    transform = create_transform(
        input_size=size,
        is_training=True,
        scale=crop_scale,
        ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        vflip=0.0,
        color_jitter=0.4,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
    )
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
    return transform


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the RNGs timm's augmentations draw from (Python's, NumPy's global - RandAugment picks its
    ops with it - and torch's) for one sample, without disturbing the caller's streams."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # torch.manual_seed also queues CUDA seeding: ms per call
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def resized_crop_box(
    width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``rng``: (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height  # the fallback: a centre crop at the nearest allowed aspect ratio
    if width / height < ratio[0]:
        h = int(round(w / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(h * ratio[1]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


CROP_SCALE = (0.08, 1.0)  # the authors' RandomResizedCrop area range (timm's default)


def check_crop_scale(crop_scale: tuple[float, ...]) -> None:
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must be two area fractions 0 < low <= high <= 1, got {list(crop_scale)}")


class ImageTransform:
    def __init__(self, kind: Augment, size: int, crop_scale: tuple[float, float] = CROP_SCALE):
        if kind not in ("paper", "light", "none"):
            raise ValueError(f"augment must be paper, light or none, got {kind!r}")
        check_crop_scale(crop_scale)
        self.kind, self.size, self.crop_scale = kind, size, tuple(crop_scale)
        self.pipeline = _paper_transform(size, self.crop_scale) if kind == "paper" else None

    def __call__(self, image: Image.Image, seed: int | None = None):
        if self.kind == "paper":
            with _seeded(seed) if seed is not None else contextlib.nullcontext():
                return self.pipeline(image)
        if self.kind == "none":
            return resize_pixels(rgbx_pixels(image), self.size)
        rng = random.Random(seed)
        crop = resize_pixels(rgbx_pixels(image.crop(resized_crop_box(*image.size, rng, self.crop_scale))), self.size)
        return crop.flip(1) if rng.random() < 0.5 else crop

    def item_layout(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one item: what a batch buffer must hold."""
        if self.kind == "paper":
            return (3, self.size, self.size), torch.float32
        return (self.size, self.size, 4), torch.uint8

    def collate(self, items: list, out: torch.Tensor | None = None) -> torch.Tensor:
        # RGBX items stay RGBX: dropping the padding byte in this copy would make it a per-pixel repack
        return torch.stack(items, out=out)

    def finish(self, batch: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        if batch.dtype != torch.uint8:
            return batch
        batch = batch[..., :3]
        b, h, w, c = batch.shape
        out = torch.empty((b, c, h, w), dtype=torch.float32, device=batch.device)
        scale, shift = _INV_STD_255.to(out.device), _SHIFT.to(out.device)
        # image by image, so the three passes (transpose + convert, scale, shift) stay in cache
        for image, pixels in zip(out.split(1), batch.split(1)) if out.device.type == "cpu" else [(out, batch)]:
            image.copy_(pixels.permute(0, 3, 1, 2)).mul_(scale).sub_(shift)
        return out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST), dtype=np.uint8)
