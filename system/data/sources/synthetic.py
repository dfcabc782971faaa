"""Deterministic photo-like scenes with exact masks, for tests, the demo and quality benchmarks.

Each class differs from every other in colour (hues spread by the golden angle), shape and texture,
so a tiny model trained on a CPU can tell them apart from image-level tags. Scenes put 1-3
objects at random scales (25-60 % of the side), positions and rotations on a muted, noisy
background; later objects occlude earlier ones. An object that ends up mostly hidden keeps its
visible pixels marked 255 (ignore) and gives no tag, so tags and masks always agree.

``render(index, num_classes, size, seed) -> (jpeg bytes, mask, class indices)`` depends only on its
arguments: the same call gives the same bytes on every machine with the same Pillow.
"""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from system.data.sources import Entry, Loaded, SourceConfig

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "checker")
MAX_CLASSES = 24
_MIN_VISIBLE = 0.35  # fraction of an object that must stay visible for it to count as present


def class_style(k: int) -> tuple[str, str, tuple[float, float, float]]:
    shape = SHAPES[k % len(SHAPES)]
    texture = TEXTURES[(k + k // len(SHAPES)) % len(TEXTURES)]
    hue = (k * 0.381966) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return shape, texture, rgb


def class_names(num_classes: int) -> list[str]:
    names = []
    for k in range(num_classes):
        shape, texture, _ = class_style(k)
        names.append(f"{shape}-{texture}-h{round(((k * 0.381966) % 1.0) * 360):03d}")
    return names


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        corners = 10
    elif shape == "cross":
        arm = 0.35
        pts = [
            (arm, 1),
            (arm, arm),
            (1, arm),
            (1, -arm),
            (arm, -arm),
            (arm, -1),
            (-arm, -1),
            (-arm, -arm),
            (-1, -arm),
            (-1, arm),
            (-arm, arm),
            (-arm, 1),
        ]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]
    else:
        corners = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}[shape]
        radii = [r * (1.15 if shape == "triangle" else 1.0)] * corners
        if shape == "square":
            angle += math.pi / 4
    return [
        (
            cx + radii[i] * math.cos(angle + 2 * math.pi * i / corners),
            cy + radii[i] * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("disc", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        if shape == "ring":
            inner = r * 0.5
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture(texture: str, size: int, period: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if texture == "solid":
        return np.ones((size, size), dtype=np.float32)
    if texture == "stripes":
        return ((u // (period / 2)) % 2).astype(np.float32)
    if texture == "checker":
        return (((u // period) + (v // period)) % 2).astype(np.float32)
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    return (du * du + dv * dv > (period * 0.3) ** 2).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.uniform(70, 180, size=(4, 4, 3)).astype(np.float32)
    grey = coarse.mean(axis=2, keepdims=True)
    coarse = grey + 0.35 * (coarse - grey)  # muted colours so objects stand out by colour
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return smooth + rng.normal(0, 9, size=(size, size, 3)).astype(np.float32)


def render(index: int, num_classes: int, size: int, seed: int = 0) -> tuple[bytes, np.ndarray, list[int]]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"source.num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    if size < 32:
        raise ValueError(f"source.image_size must be at least 32, got {size}")
    rng = np.random.default_rng([seed, index])
    image = _background(size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    placed = []
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(num_classes))
        shape, texture, rgb = class_style(k)
        r = size * rng.uniform(0.125, 0.3)
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        region = _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if not region.any():
            continue
        colour = np.clip(np.array(rgb) * 255 * rng.uniform(0.85, 1.05) + rng.normal(0, 8, 3), 0, 255)
        pattern = _texture(texture, size, max(4.0, r / 2.5), rng.uniform(0, math.pi))
        shade = 0.45 + 0.55 * pattern[..., None]
        image[region] = (colour * shade)[region]
        mask[region] = k + 1
        placed.append((k, int(region.sum())))
    present = []
    for k, area in placed:
        visible = int((mask == k + 1).sum())
        if visible >= _MIN_VISIBLE * area or k in present:
            present.append(k)
    for k, _ in placed:
        if k not in present:
            mask[mask == k + 1] = 255
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue(), mask, sorted(set(present))


class SyntheticSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.class_names = class_names(cfg.num_classes)
        render(0, cfg.num_classes, cfg.image_size, cfg.seed)  # validates the settings before any task starts

    def entries(self):
        for i in range(self.cfg.num_images):
            yield Entry(id=f"syn{self.cfg.seed}_{i:07d}", image=f"synthetic:{self.cfg.seed}/{i}")

    def load(self, entry: Entry) -> Loaded:
        index = int(entry.image.rsplit("/", 1)[1])
        image, mask, classes = render(index, self.cfg.num_classes, self.cfg.image_size, self.cfg.seed)
        return Loaded(image, mask if self.cfg.masks else None, tuple(self.class_names[k] for k in classes))
