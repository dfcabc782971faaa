"""Segmentation masks: the PASCAL palette PNG, and the codec seam a labelling job writes through.

Class-index masks (0 = background, k+1 = class k, 255 = ignore) are stored as palette PNGs so the
file holds the exact indices while any image viewer shows the familiar VOC colours. Ingest writes GT
masks this way and the labelling job writes pseudo labels the same way.

A labelling job's mask files go through one ``MaskCodec`` (``mask_codec(name)``): its file suffix,
its encoder (which embeds the image's stats line, so a mask and its statistics can never disagree
and a lost line is recovered from the file), its decoder and its line reader. Resume, the final
pass and evaluation know masks only through it, so another mask format is one class here.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from functools import lru_cache
from typing import ClassVar

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


class MaskCodec:
    """How a labelling job stores one mask and its stats line."""

    name: ClassVar[str]
    suffix: ClassVar[str]

    def encode(self, mask: np.ndarray, line: dict | None = None) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def read_line(self, data: bytes) -> dict | None:
        """The stats line ``encode`` embedded, or None when the file carries none."""
        raise NotImplementedError


class PalettePng(MaskCodec):
    """The palette PNG of ``encode_mask``, with the stats line in a ``tEXt`` chunk right after IHDR."""

    name = "png"
    suffix = ".png"
    TEXT_KEY = "clustercam"
    _IHDR_END = 8 + 4 + 4 + 13 + 4  # signature + IHDR chunk (length, type, 13 data bytes, crc)

    def encode(self, mask: np.ndarray, line: dict | None = None) -> bytes:
        png = encode_mask(mask)
        if line is None:
            return png
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        data = self.TEXT_KEY.encode("latin-1") + b"\0" + text
        chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
        return png[: self._IHDR_END] + chunk + png[self._IHDR_END :]

    def decode(self, data: bytes) -> np.ndarray:
        return decode_mask(data)

    def read_line(self, data: bytes) -> dict | None:
        with Image.open(io.BytesIO(data)) as image:
            text = image.text.get(self.TEXT_KEY)
        return json.loads(text) if text else None


MASK_CODECS: dict[str, MaskCodec] = {codec.name: codec for codec in (PalettePng(),)}


def mask_codec(name: str) -> MaskCodec:
    try:
        return MASK_CODECS[name]
    except KeyError:
        raise ValueError(f"mask format {name!r} is not one of {', '.join(sorted(MASK_CODECS))}") from None
