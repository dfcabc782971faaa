"""Turn one loaded input into the members of a shard sample, or refuse it with a reason.

The checks are what training and labelling would otherwise trip on hours later: empty, truncated or
unrecognised files, decompression bombs, unknown or missing labels, masks that do not match the
image. Greyscale, palette and alpha images are kept byte-for-byte (the stream converts them to RGB
when it decodes), and formats other than JPEG/PNG/WebP are re-encoded losslessly as PNG so every
shard holds only formats every reader decodes. CMYK (and YCCK) JPEGs, 16-bit, integer and float
images, and images with an EXIF orientation are converted (``system.data.convert``, the helper the
labeller uses on a manifest's images too) and stored re-encoded, a JPEG as a JPEG (quality 95) and
anything else as a PNG; the sample's json lists the steps (``converted``), and a mask in the stored
pixels' frame is turned with the image.

Two levels of checking (``verify``). ``structure`` (the default) checks each file's structure
without decoding pixels: a JPEG's every marker segment, table and scan through EOI with libjpeg's
rules, restart markers exactly where the restart interval puts them and enough entropy-coded bytes
for each scan's blocks (``system.data.jpeg``, which also supplies the size and colour layout); a
PNG's chunk CRCs through IEND and its inflated pixel data against the exact size its header needs
(``system.data.png``); other formats are decoded. On 8,000 randomly damaged JPEGs (truncation, bit
flips, overwritten or deleted runs; baseline and progressive) it refused every file that a decode
refuses, and some that a decode lets through with a warning (a marker inside the entropy data blanks
the rest of the image), at a few percent of a 1/8-scale decode's cost (a PNG's inflate costs
nearly a decode). ``decode`` runs the same structure check and then decodes every image
(JPEGs at 1/8 scale: libjpeg's DCT scaling still reads every byte of the entropy stream), so it
refuses everything ``structure`` refuses and more: a decode alone would pass a PNG with a damaged
CRC or a JPEG whose restart markers are off, where libjpeg only warns. Neither catches a bit error
inside JPEG entropy data, which libjpeg decodes with a warning; the training stream skips any sample
that still fails to decode.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from system.data.convert import CONVERTED_MODES, KEPT_MODES, Normalised, mask_upright, needs_work, normalise
from system.data.jpeg import check_jpeg
from system.data.png import check_png
from system.data.sources import BadEntry, Entry, Loaded
from system.masks import encode_mask

_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_MODES = KEPT_MODES | CONVERTED_MODES
_EXIF = b"Exif\x00\x00"
JPEG_QUALITY = 95
Verify = Literal["structure", "decode"]


_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def _check_size_and_mode(width: int, height: int, mode: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadEntry("too_large", f"image too large ({width}x{height} > {max_pixels} pixels)")
    if width < 1 or height < 1:
        raise BadEntry("corrupt", f"image has no pixels ({width}x{height})")
    if mode not in _MODES:
        raise BadEntry("unsupported_mode", f"unsupported image mode {mode}")


def _corrupt(kind: str, exc: Exception) -> BadEntry:
    return BadEntry("corrupt", f"corrupt or truncated image ({kind}: {exc})")


@dataclass(frozen=True)
class Inspected:
    """An acceptable image as the shard stores it."""

    ext: str
    data: bytes
    width: int  # upright, as stored in the shard
    height: int
    done: Normalised | None = None  # the conversion, when the stored bytes are not the input's

    @property
    def converted(self) -> tuple[str, ...]:
        return self.done.converted if self.done else ()


def _inspect_jpeg(data: bytes, max_pixels: int) -> tuple[int, int, int]:
    """(width, height, components): the structure walk reads the frame header too, so a plain JPEG
    needs no second parser (PIL's)."""
    try:
        frame = check_jpeg(data)
    except ValueError as exc:
        raise _corrupt("jpeg", exc) from None
    mode = _JPEG_MODES.get(frame.components, f"{frame.components}-component")
    _check_size_and_mode(
        frame.width, frame.height, mode if frame.precision == 8 else f"{frame.precision}-bit {mode}", max_pixels
    )
    return frame.width, frame.height, frame.components


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadEntry("unreadable", "unreadable image (format not recognised)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadEntry("too_large", f"image too large ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadEntry("corrupt", f"corrupt image header ({exc})") from None


def _decode(image: Image.Image) -> None:
    """Every pixel, with Pillow refusing a short file rather than padding it."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: decoding would not refuse truncated images")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _corrupt(f"{(image.format or 'image').lower()} decode", exc) from None


def _converted(image: Image.Image, fmt: str) -> Inspected:
    """Decode (refusing a short file as ``_decode`` does), convert, and re-encode as ``fmt``."""
    _decode(image)
    icc = image.info.get("icc_profile") if image.mode in KEPT_MODES else None  # CMYK's profile was applied
    done = normalise(image)
    out = io.BytesIO()
    if fmt == "JPEG":
        done.image.save(out, format="JPEG", quality=JPEG_QUALITY, icc_profile=icc)
        ext = "jpg"
    else:
        done.image.save(out, format="PNG", icc_profile=icc)
        ext = "png"
    return Inspected(ext, out.getvalue(), done.image.width, done.image.height, done)


def inspect_image(data: bytes, max_pixels: int, verify: Verify = "structure") -> Inspected:
    """An acceptable image as the shard stores it. ``decode`` runs every ``structure`` check before it
    decodes, so it refuses whatever ``structure`` refuses; a converted image is always decoded."""
    if not data:
        raise BadEntry("empty", "empty file (0 bytes)")
    if data[:2] == b"\xff\xd8":
        width, height, components = _inspect_jpeg(data, max_pixels)
        if components == 4 or data.find(_EXIF, 0, 1 << 17) >= 0:  # only then is PIL's header parse needed
            image = _open(data)
            if needs_work(image):
                return _converted(image, "JPEG")
        if verify == "decode":
            image = _open(data)
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            _decode(image)
        return Inspected("jpg", data, width, height)
    image = _open(data)
    width, height = image.size
    _check_size_and_mode(width, height, image.mode, max_pixels)
    fmt = image.format
    if fmt == "PNG":
        try:
            check_png(data)
        except ValueError as exc:
            raise _corrupt("png", exc) from None
    if needs_work(image):
        return _converted(image, "PNG")
    if fmt != "PNG" or verify == "decode":  # other formats have no structure check but a decode
        _decode(image)
    if fmt in _KEEP:
        return Inspected(_KEEP[fmt], data, width, height)
    out = io.BytesIO()
    image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB").save(out, format="PNG")
    return Inspected("png", out.getvalue(), width, height)


def sample_members(
    entry: Entry, loaded: Loaded, class_index: dict[str, int], max_pixels: int, verify: Verify = "structure"
) -> tuple[list[tuple[str, bytes]], bool, bool]:
    """The tar members (extension, bytes) of one accepted sample, in a fixed order; whether it has a
    mask; whether its labels are partial (it carries ``known``)."""
    inspected = inspect_image(loaded.image, max_pixels, verify)
    width, height = inspected.width, inspected.height
    unknown = [name for name in loaded.labels if name not in class_index]
    if unknown:
        raise BadEntry("unknown_class", f"unknown class name(s): {', '.join(map(repr, unknown))}")
    labels = sorted({class_index[name] for name in loaded.labels})
    if not labels:
        raise BadEntry("no_labels", "no labels")
    members = [(inspected.ext, inspected.data)]
    meta = {"id": entry.id, "labels": labels, "width": width, "height": height, "source": entry.image}
    if inspected.converted:
        meta["converted"] = list(inspected.converted)
    if loaded.negatives is not None:  # partial labels: "known" lists positives and verified negatives
        meta["known"] = sorted({*labels, *(class_index[n] for n in loaded.negatives if n in class_index)})
    members.append(("json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")))
    mask = loaded.mask
    if mask is not None and inspected.done:
        mask = mask_upright(mask, inspected.done)
    if mask is not None:
        if mask.shape != (height, width):
            raise BadEntry(
                "mask_size", f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {width}x{height}"
            )
        values = np.unique(mask)
        bad = [int(v) for v in values if v != 255 and v > len(class_index)]
        if bad:
            raise BadEntry("mask_values", f"mask has values {bad} outside 0..{len(class_index)} and 255")
        members.append(("mask.png", encode_mask(mask)))
    return members, mask is not None, "known" in meta
