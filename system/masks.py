"""Segmentation masks as 8-bit palette PNGs with the PASCAL VOC colour map.

Class-index masks (0 = background, k+1 = class k, 255 = ignore) are stored as palette PNGs so the
file holds the exact indices while any image viewer shows the familiar VOC colours. Ingest writes GT
masks this way and the labelling job writes pseudo labels the same way.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def _palette_array() -> np.ndarray:
    """The VOC devkit's bit-interleaved colour map; index 255 comes out as (224, 224, 192)."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def pascal_palette() -> list[int]:
    return _palette_array().reshape(-1).tolist()


def encode_mask(mask: np.ndarray) -> bytes:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("mask values must lie in 0..255")
        mask = mask.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(mask))
    image.putpalette(pascal_palette())  # turns the "L" image into "P" with the same indices
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Class indices from a mask PNG; RGB masks are mapped back through the VOC colour map."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("P", "L"):
            return np.array(image, dtype=np.uint8)
        if image.mode not in ("RGB", "RGBA"):
            raise ValueError(f"unsupported mask image mode {image.mode}")
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    cmap = _palette_array().astype(np.uint32)
    table = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    order = np.argsort(table, kind="stable")
    pos = np.searchsorted(table[order], codes)
    pos = np.clip(pos, 0, len(table) - 1)
    found = table[order][pos] == codes
    if not found.all():
        raise ValueError("mask has colours outside the PASCAL colour map")
    return order[pos].astype(np.uint8)
