"""Overlay previews and a contact sheet: people check masks by eye before they trust a million.

A preview is only useful when the mask can be seen: small images (the demo's are 64 pixels) are
scaled up to ``min_side`` (the image smoothly, the mask with nearest-neighbour sampling so its
edges stay the model's), and every tile carries its own legend (class colour, name, share of
pixels). The contact sheet packs tiles in justified rows - each row's tiles scaled to one height
that fills the sheet's width - so the page holds tiles, not white space.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from system.masks import pascal_palette
from system.refine import IGNORE_INDEX

_ALPHA = 0.55
_ROW = 16


def _names(class_names: list[str]) -> dict[int, str]:
    return {0: "background", IGNORE_INDEX: "ignore", **{k + 1: n for k, n in enumerate(class_names)}}


def overlay(
    pixels: np.ndarray,
    mask: np.ndarray,
    class_names: list[str],
    title: str = "",
    max_side: int = 384,
    min_side: int = 256,
) -> Image.Image:
    """The image beside the image blended with the mask's PASCAL colours, a legend of the classes below;
    the longer side scaled into ``min_side``..``max_side``."""
    H, W = mask.shape
    longest = max(H, W)
    scale = max_side / longest if longest > max_side else max(1.0, min(min_side, max_side) / longest)
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    image = Image.fromarray(pixels).convert("RGB").resize(size, Image.BICUBIC if scale > 1 else Image.BILINEAR)
    small = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    palette = np.array(pascal_palette(), dtype=np.float32).reshape(256, 3)
    base = np.asarray(image, dtype=np.float32)
    colours = palette[small]
    blend = np.where((small == 0)[..., None], base * 0.6, base * (1 - _ALPHA) + colours * _ALPHA)
    names = _names(class_names)
    values = [int(v) for v in np.unique(mask)]
    labels = [f"{names.get(v, str(v))} {100 * float((mask == v).mean()):.0f}%" for v in values]
    font = ImageFont.load_default()
    gap = 4
    width = 2 * size[0] + gap
    column = min(width, 20 + max(int(ImageDraw.Draw(image).textlength(t, font=font)) for t in labels))
    per_row = max(1, width // column)
    header = _ROW if title else 0
    canvas = Image.new("RGB", (width, header + size[1] + -(-len(values) // per_row) * _ROW + 4), (255, 255, 255))
    canvas.paste(image, (0, header))
    canvas.paste(Image.fromarray(blend.clip(0, 255).astype(np.uint8)), (size[0] + gap, header))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0), font=font)
    for i, (v, text) in enumerate(zip(values, labels)):
        x = 2 + (i % per_row) * column
        y = header + size[1] + 2 + (i // per_row) * _ROW
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=tuple(int(c) for c in palette[v]), outline=(0, 0, 0))
        draw.text((x + 14, y), text, fill=(0, 0, 0), font=font)
    return canvas


def contact_sheet(tiles: list[Image.Image], columns: int = 4, gap: int = 8) -> Image.Image:
    """``columns`` tiles a row, each row scaled to the one height that makes it fill the sheet's width
    (``columns`` median-wide tiles), so rows have no gaps; the last row keeps the median height."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    columns = max(1, min(columns, len(tiles)))
    widths, heights = sorted(t.width for t in tiles), sorted(t.height for t in tiles)
    inner = columns * widths[len(widths) // 2]
    typical = heights[len(heights) // 2]
    right = gap + inner + (columns - 1) * gap
    placed: list[tuple[Image.Image, int, int]] = []
    y = gap
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        height = max(1, round(inner / sum(t.width / t.height for t in row)))
        if len(row) < columns:
            height = min(height, typical)
        x = gap
        for i, tile in enumerate(row):
            width = max(1, round(tile.width * height / tile.height))
            if len(row) == columns and i == columns - 1:  # rounding must not leave a ragged right edge
                width = max(1, right - x)
            if (width, height) != tile.size:
                tile = tile.resize((width, height), Image.LANCZOS if height < tile.height else Image.BICUBIC)
            placed.append((tile, x, y))
            x += width + gap
        y += height + gap
    sheet = Image.new("RGB", (right + gap, y), (255, 255, 255))
    for tile, x, top in placed:
        sheet.paste(tile.convert("RGB"), (x, top))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
