"""COCO instances JSON + image folder.

Tags are the categories of an image's instances; classes are the categories in ascending id order
(ids 1..90 -> 0..79 as in the paper). Ids are the image file stems (``COCO_train2014_000000000009``
for 2014, ``000000000009`` for 2017), the form the authors' id lists use. Each instance is rasterised
by pycocotools exactly as ``COCO.annToMask`` does (polygon parts merged, uncompressed RLE converted,
compressed RLE decoded), so GT masks and every COCO mIoU computed on them match the literature pixel
for pixel. Larger instances are painted first so small ones stay visible; crowd regions become 255
(ignore) under the individual instances, since a crowd box mixes object and background.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import numpy as np
from pycocotools import mask as mask_utils

from system import storage
from system.data.sources import BadEntry, Entry, Loaded, SourceConfig


def instance_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """One annotation's (H, W) bool mask, by ``COCO.annToRLE``'s rules.

    pycocotools refuses RLE counts that overrun the mask but leaves the pixels after counts that stop
    short undefined, so short counts are refused here: plain counts by their sum, a compressed string
    by re-encoding its decode, which gives the same string back only when its counts cover the mask
    (every string pycocotools writes does).
    """
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            _check_size(segmentation, height, width)
            counts = segmentation["counts"]
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise BadEntry("bad_segmentation", f"RLE counts do not sum to {height}x{width} pixels")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            _check_size(segmentation, height, width)
            counts = segmentation["counts"]
            given = counts.encode("ascii") if isinstance(counts, str) else counts
            region = mask_utils.decode({"size": [height, width], "counts": given})
            if mask_utils.encode(np.asfortranarray(region))["counts"] != given:
                raise BadEntry("bad_segmentation", f"compressed RLE counts do not cover the {height}x{width} mask")
            return region.astype(bool)
        else:
            raise BadEntry("bad_segmentation", f"segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")
        return mask_utils.decode(rle).astype(bool)
    except BadEntry:
        raise
    except Exception as exc:  # pycocotools raises bare Exception, TypeError and ValueError on malformed input
        raise BadEntry("bad_segmentation", f"malformed segmentation ({type(exc).__name__}: {exc})") from None


def _check_size(rle: dict, height: int, width: int) -> None:
    if list(rle.get("size", ())) != [height, width]:
        raise BadEntry("mask_size", f"RLE size {rle.get('size')} differs from image size {height}x{width} (H, W)")


def rasterise(height: int, width: int, annotations: list) -> np.ndarray:
    """annotations: [class index, iscrowd, area, segmentation] -> mask (0 bg, k+1, 255 crowd)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    ordered = sorted(annotations, key=lambda a: (not a[1], -a[2]))
    for class_index, iscrowd, _, segmentation in ordered:
        mask[instance_mask(segmentation, height, width)] = 255 if iscrowd else class_index + 1
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
