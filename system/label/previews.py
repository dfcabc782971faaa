"""Overlay previews and a contact sheet: people check masks by eye before they trust a million."""

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
    pixels: np.ndarray, mask: np.ndarray, class_names: list[str], title: str = "", max_side: int = 384
) -> Image.Image:
    """The image beside the image blended with the mask's PASCAL colours, a legend of the classes below."""
    H, W = mask.shape
    scale = min(1.0, max_side / max(H, W))
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    image = Image.fromarray(pixels).convert("RGB").resize(size, Image.BILINEAR)
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


def contact_sheet(tiles: list[Image.Image], columns: int = 4, tile: int = 320) -> Image.Image:
    """Tiles shrunk to ``tile`` pixels wide, in a grid whose rows are as tall as their tallest tile."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    thumbs = []
    for image in tiles:
        thumb = image.copy()
        thumb.thumbnail((tile - 4, 4 * tile), Image.BILINEAR)
        thumbs.append(thumb)
    columns = min(columns, len(thumbs))
    rows = [thumbs[i : i + columns] for i in range(0, len(thumbs), columns)]
    heights = [max(t.size[1] for t in row) + 4 for row in rows]
    sheet = Image.new("RGB", (columns * tile, sum(heights)), (255, 255, 255))
    y = 0
    for row, height in zip(rows, heights):
        for i, thumb in enumerate(row):
            sheet.paste(thumb, (i * tile + 2, y + 2))
        y += height
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
