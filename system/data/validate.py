"""Turn one loaded input into the members of a shard sample, or refuse it with a reason.

The checks are what training and labelling would otherwise trip on hours later: empty, truncated or
unrecognised files, CMYK or 16-bit images, decompression bombs, unknown or missing labels, masks
that do not match the image. Greyscale, palette and alpha images are kept byte-for-byte (the stream
converts them to RGB when it decodes), and formats other than JPEG/PNG/WebP are re-encoded
losslessly as PNG so every shard holds only formats every reader decodes.

Two levels of checking (``verify``): ``decode`` decodes every image - JPEGs at 1/8 scale (libjpeg's
DCT scaling still reads every byte of the entropy stream, so truncation and broken streams are
caught at a fraction of a full decode's cost); ``header`` parses the header and checks that a JPEG
ends with its EOI marker and that a PNG's chunks are intact (CRCs), which catches truncation at
near copy speed but lets a JPEG with damaged entropy data through (libjpeg decodes those with a
warning, not an error).

Public API::

    Verify = Literal["decode", "header"]
    inspect_image(data, max_pixels, verify="decode") -> (ext, data, width, height)   # raises BadEntry
    sample_members(entry, loaded, class_index, max_pixels, verify="decode") -> (members, has_mask)
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from system.data.sources import BadEntry, Entry, Loaded
from system.masks import encode_mask

_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "La", "RGBa"}
Verify = Literal["decode", "header"]


def _check_structure(image: Image.Image, data: bytes) -> None:
    if image.format == "JPEG":
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            raise OSError("image file is truncated (no end-of-image marker)")
    elif image.format == "PNG":
        image.verify()
    else:
        image.load()


def inspect_image(data: bytes, max_pixels: int, verify: Verify = "decode") -> tuple[str, bytes, int, int]:
    if not data:
        raise BadEntry("empty", "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadEntry("unreadable", "unreadable image (format not recognised)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadEntry("too_large", f"image too large ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadEntry("corrupt", f"corrupt image header ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadEntry("too_large", f"image too large ({width}x{height} > {max_pixels} pixels)")
    if width < 1 or height < 1:
        raise BadEntry("corrupt", f"image has no pixels ({width}x{height})")
    if image.mode == "CMYK":
        raise BadEntry("cmyk", "CMYK image (colours are unreliable without colour management)")
    if image.mode not in _MODES:
        raise BadEntry("unsupported_mode", f"unsupported image mode {image.mode}")
    fmt = image.format
    try:
        if verify == "header":
            _check_structure(image, data)
        else:
            if fmt == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadEntry("corrupt", f"corrupt or truncated image ({exc})") from None
    if fmt in _KEEP:
        return _KEEP[fmt], data, width, height
    if verify == "header":
        image = Image.open(io.BytesIO(data))  # verify() leaves the image unusable
    out = io.BytesIO()
    image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB").save(out, format="PNG")
    return "png", out.getvalue(), width, height


def sample_members(entry: Entry, loaded: Loaded, class_index: dict[str, int], max_pixels: int,
                   verify: Verify = "decode") -> tuple[list[tuple[str, bytes]], bool]:
    """The tar members (extension, bytes) of one accepted sample, in a fixed order."""
    ext, image, width, height = inspect_image(loaded.image, max_pixels, verify)
    unknown = [name for name in loaded.labels if name not in class_index]
    if unknown:
        raise BadEntry("unknown_class", f"unknown class name(s): {', '.join(map(repr, unknown))}")
    labels = sorted({class_index[name] for name in loaded.labels})
    if not labels:
        raise BadEntry("no_labels", "no labels")
    members = [(ext, image)]
    meta = {"id": entry.id, "labels": labels, "width": width, "height": height, "source": entry.image}
    members.append(("json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")))
    mask = loaded.mask
    if mask is not None:
        if mask.shape != (height, width):
            raise BadEntry("mask_size", f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {width}x{height}")
        values = np.unique(mask)
        bad = [int(v) for v in values if v != 255 and v > len(class_index)]
        if bad:
            raise BadEntry("mask_values", f"mask has values {bad} outside 0..{len(class_index)} and 255")
        members.append(("mask.png", encode_mask(mask)))
    return members, mask is not None
