"""Every image a corpus holds, as pixels every reader shows the same way: one helper for ingest and labelling.

Web corpora hold CMYK JPEGs (Adobe-inverted and YCCK ones among them: libjpeg and Pillow undo both),
16-bit and float images, and camera JPEGs whose pixels are stored sideways with an EXIF orientation
saying how to show them. Training libraries convert all of these; refusing them threw valid images
away. ``normalise`` turns a decoded image into one a plain RGB conversion shows correctly:

- CMYK through the embedded ICC profile when there is one (``PIL.ImageCms``, to sRGB), else with
  the naive ink formula R = (255 - C)(255 - K) / 255, which is what a viewer without colour
  management shows;
- 16-bit integer images (``I;16*``) scaled by their full 16-bit range, not clipped at 255 as Pillow's
  own conversion does; ``I`` (32-bit integer) by 0..65535 when its values fit (a 16-bit source,
  as older Pillows open 16-bit PNGs), else by its own min..max; ``F`` by 0..1 when its values fit,
  else by its min..max; ``YCbCr`` and other colour spaces through Pillow's RGB conversion;
- the EXIF orientation applied (transposed pixels), and reported so a mask stored in the same
  frame as the pixels gets the same transpose (``orient_mask``).

``converted`` names each step (``cmyk->rgb(icc)``, ``i16->l``, ``exif:rotate90``) for the sample's
json. Modes every reader already handles (L, RGB, RGBA, LA, P, 1) are left alone: the stream's and
the labeller's RGB conversion composes alpha and palettes the same way for both.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms

KEPT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "La", "RGBa"})
CONVERTED_MODES = frozenset({"CMYK", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "YCbCr", "LAB", "HSV"})
ORIENTATION_TAG = 0x0112
# EXIF orientation -> (Pillow transpose, name): the same table as ImageOps.exif_transpose
_ORIENT = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirror"),
    3: (Image.Transpose.ROTATE_180, "rotate180"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flip"),
    5: (Image.Transpose.TRANSPOSE, "transpose"),
    6: (Image.Transpose.ROTATE_270, "rotate90"),
    7: (Image.Transpose.TRANSVERSE, "transverse"),
    8: (Image.Transpose.ROTATE_90, "rotate270"),
}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass(frozen=True)
class Normalised:
    image: Image.Image  # loaded, mode in KEPT_MODES, upright
    converted: tuple[str, ...]  # what was done, in order; empty: the input as it was
    orientation: int  # the EXIF orientation applied (1: none)
    stored_size: tuple[int, int]  # (width, height) of the pixels as stored, before any transpose


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), 1 when absent or out of range."""
    if "exif" not in image.info and image.format not in ("TIFF", "MPO"):
        return 1
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


def needs_work(image: Image.Image, upright: bool = True) -> bool:
    """Whether ``normalise`` would change anything (no pixel is decoded to find out)."""
    return image.mode not in KEPT_MODES or (upright and orientation(image) != 1)


def _cmyk_to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB"), "cmyk->rgb(icc)"
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a damaged or non-CMYK profile: the naive formula still gives usable colours
    ink = np.asarray(image, dtype=np.float32)
    rgb = (255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB"), "cmyk->rgb"


def _scaled(values: np.ndarray, low: float, high: float) -> Image.Image:
    span = high - low if high > low else 1.0
    out = np.rint((values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / span)).clip(0, 255)
    return Image.fromarray(out.astype(np.uint8), "L")


def _to_kept_mode(image: Image.Image) -> tuple[Image.Image, str]:
    mode = image.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode.startswith("I;16"):
        return _scaled(np.asarray(image).astype(np.uint16), 0, 65535), "i16->l"
    if mode in ("I", "F"):
        values = np.asarray(image)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        natural = (0, 65535) if mode == "I" else (0, 1)
        if natural[0] <= low and high <= natural[1]:
            return _scaled(values, *natural), f"{mode.lower()}({natural[0]}..{natural[1]})->l"
        return _scaled(values, low, high), f"{mode.lower()}(min..max)->l"
    return image.convert("RGB"), f"{mode.lower()}->rgb"


def normalise(image: Image.Image, upright: bool = True) -> Normalised:
    """``image`` (opened, size already checked) decoded into a kept mode, upright when ``upright``."""
    turn = orientation(image) if upright else 1
    stored = image.size
    image.load()
    steps: list[str] = []
    if image.mode not in KEPT_MODES:
        image, step = _to_kept_mode(image)
        steps.append(step)
    if turn != 1:
        method, name = _ORIENT[turn]
        image = image.transpose(method)
        steps.append(f"exif:{name}")
    return Normalised(image, tuple(steps), turn, stored)


def orient_mask(mask: np.ndarray, turn: int) -> np.ndarray:
    """A mask stored in the same frame as the image's pixels, turned the way ``normalise`` turned them."""
    if turn == 1:
        return mask
    return np.asarray(Image.fromarray(mask).transpose(_ORIENT[turn][0]))


def mask_upright(mask: np.ndarray, done: Normalised) -> np.ndarray:
    """A mask of the stored pixels' size shares their frame and is turned with them; one already of the
    upright size (a tool that annotated the displayed image) is left as it is."""
    width, height = done.stored_size
    if done.orientation == 1 or mask.shape != (height, width):
        return mask
    return orient_mask(mask, done.orientation)


def gt_upright(mask: np.ndarray, image: bytes) -> np.ndarray:
    """``mask_upright`` for a mask beside an image file, reading only the image's header (evaluation
    of a manifest, whose labels were written upright)."""
    try:
        opened = Image.open(io.BytesIO(image))
    except (OSError, SyntaxError, ValueError):
        return mask
    with opened:
        return mask_upright(mask, Normalised(opened, (), orientation(opened), opened.size))
