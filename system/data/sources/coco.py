"""COCO instances JSON + image folder.

Tags are the categories of an image's instances; classes are the categories in ascending id order
(ids 1..90 -> 0..79 as in the paper). Ids are the image file stems (``COCO_train2014_000000000009``
for 2014, ``000000000009`` for 2017), the form the authors' id lists use. Semantic GT masks are
rasterised here without pycocotools: polygons with PIL's ImageDraw, RLE (plain counts or the
compressed string form) decoded in numpy. Larger instances are painted first so small ones stay
visible; crowd regions become 255 (ignore) under the individual instances, since a crowd box mixes
object and background.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageDraw

from system import storage
from system.data.sources import BadEntry, Entry, Loaded, SourceConfig


def decode_rle_string(counts: str) -> list[int]:
    """pycocotools' compressed counts: 6-bit chunks (offset 48), deltas after the third count."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x = 0
        k = 0
        more = True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_to_mask(rle: dict) -> np.ndarray:
    """Column-major runs of 0s then 1s -> (H, W) bool."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = decode_rle_string(counts)
    flat = np.zeros(height * width, dtype=bool)
    starts = np.cumsum([0, *counts[:-1]])
    for start, length in zip(starts[1::2], counts[1::2]):
        flat[start : start + length] = True
    return flat.reshape(width, height).T


def rasterise(height: int, width: int, annotations: list) -> np.ndarray:
    """annotations: [class index, iscrowd, area, segmentation] -> mask (0 bg, k+1, 255 crowd)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    mask = np.zeros((height, width), dtype=np.uint8)
    ordered = sorted(annotations, key=lambda a: (not a[1], -a[2]))
    for class_index, iscrowd, _, segmentation in ordered:
        value = 255 if iscrowd else class_index + 1
        if isinstance(segmentation, dict):
            region = rle_to_mask(segmentation)
            if region.shape != mask.shape:
                raise BadEntry("mask_size", f"RLE size {region.shape[::-1]} differs from image size {width}x{height}")
        else:
            canvas.paste(0, (0, 0, width, height))
            for polygon in segmentation:
                if len(polygon) >= 6:
                    draw.polygon([(polygon[i], polygon[i + 1]) for i in range(0, len(polygon) - 1, 2)], fill=1)
            region = np.asarray(canvas, dtype=bool)
        mask[region] = value
    return mask


class CocoSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.annotations = cfg.annotations or storage.join(cfg.path, "annotations", f"instances_{cfg.split}.json")
        self.images = cfg.images or storage.join(cfg.path, cfg.split)
        data = self._read()
        self._pending = data  # handed to entries() once, so the file is parsed once
        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        self.class_names = [c["name"] for c in categories]
        self._index = {c["id"]: i for i, c in enumerate(categories)}

    def _read(self) -> dict:
        try:
            data = json.loads(storage.get_bytes(self.annotations))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.annotations}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or "images" not in data or "categories" not in data:
            raise ValueError(f"{self.annotations}: not a COCO instances file (needs images and categories)")
        return data

    def entries(self):
        data = self.__dict__.pop("_pending", None) or self._read()
        per_image: dict[int, list] = {}
        for ann in data.get("annotations", []):
            per_image.setdefault(ann["image_id"], []).append(ann)
        for image in sorted(data["images"], key=lambda im: im["id"]):
            anns = per_image.get(image["id"], [])
            known = [a for a in anns if a["category_id"] in self._index]
            names = sorted({self._index[a["category_id"]] for a in known})
            labels = tuple(self.class_names[i] for i in names)
            if len(known) < len(anns):
                labels += tuple(f"category_id={a['category_id']}" for a in anns if a["category_id"] not in self._index)
            extra = None
            if self.cfg.masks:
                extra = {
                    "height": image["height"],
                    "width": image["width"],
                    "anns": [
                        [
                            self._index[a["category_id"]],
                            int(a.get("iscrowd", 0)),
                            float(a.get("area", 0)),
                            a["segmentation"],
                        ]
                        for a in known
                        if a.get("segmentation")
                    ],
                }
            yield Entry(
                id=PurePosixPath(image["file_name"]).stem,
                image=storage.join(self.images, image["file_name"]),
                labels=labels,
                extra=extra,
            )

    def load(self, entry: Entry) -> Loaded:
        image = storage.get_bytes(entry.image)
        mask = None
        if entry.extra is not None:
            mask = rasterise(entry.extra["height"], entry.extra["width"], entry.extra["anns"])
        return Loaded(image, mask, entry.labels)
