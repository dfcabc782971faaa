"""Image-tag datasets as sources of (id, image bytes, label names, optional GT mask).

A source works in two steps so that planning is cheap and the expensive part runs in parallel:
``entries()`` lists lightweight :class:`Entry` records (no image is read) in a deterministic order,
and ``load(entry)`` - run inside the ingest task that owns the entry - reads the image bytes and the
mask and settles the labels. Entries and sources are small and picklable, so a Ray task receives
exactly the entries of its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from system.config import option
from system.data.fetch import FetchConfig


@dataclass
class SourceConfig:
    """Where the input dataset lives and how to read it."""

    format: Literal["voc", "coco", "openimages", "manifest", "webdataset", "synthetic"] = option(
        "synthetic", doc="input layout: voc | coco | openimages | manifest | webdataset | synthetic"
    )
    path: str = option(
        "",
        doc="dataset root (voc, coco, openimages), manifest file (.jsonl/.csv) or webdataset tars (a .tar, "
        "a {000..009} brace pattern or a folder); local path or s3:// URI",
    )
    split: str = option(
        "train", doc="split name: voc ImageSets list, coco instances_<split>.json, openimages <split> labels"
    )
    classes: list[str] = option(
        factory=list,
        doc="class list/order: openimages subset (names or MIDs); manifest class names (default: all seen); "
        "an item '@<file>' reads names from a file: one a line, or the first CSV column "
        "(class-descriptions-boxable.csv)",
    )
    masks: bool = option(True, doc="carry ground-truth masks along when the source has them")
    ids_file: str = option("", doc="voc: id list file (e.g. the authors' voc12/train_aug_id.txt) instead of ImageSets")
    labels_file: str = option(
        "", doc="voc: the authors' cls_labels.npy; openimages: image-level labels CSV (default: found under path)"
    )
    classes_file: str = option(
        "", doc="openimages: class descriptions CSV (default: found under path); webdataset: class names, one a line"
    )
    hierarchy: str = option(
        "",
        doc="openimages: class hierarchy JSON (bbox_labels_600_hierarchy.json; relative: under path); positives "
        "then also tag their ancestors and verified negatives their descendants; empty: no expansion",
    )
    exhaustive: list[str] = option(
        factory=list,
        doc="openimages: classes whose labels the dataset declares complete (an image not tagged with one is a "
        "negative for it); every other class not verified for an image is unknown to its losses",
    )
    annotations: str = option("", doc="coco: instances JSON (default <path>/annotations/instances_<split>.json)")
    images: str = option("", doc="image folder (default: coco <path>/<split>, openimages <path>/<split>)")
    num_images: int = option(200, doc="synthetic: number of images")
    num_classes: int = option(6, doc="synthetic: number of classes (at most 24)")
    image_size: int = option(96, doc="synthetic: image side in pixels")
    seed: int = option(0, doc="synthetic: generator seed")
    fetch: FetchConfig = option(factory=FetchConfig, doc="manifest: how http(s) image URLs are fetched")


@dataclass(frozen=True)
class Entry:
    """``negatives``: partial labels - the classes verified absent; every class in neither ``labels``
    nor ``negatives`` is unknown. None: complete labels (every other class is a negative)."""

    id: str
    image: str
    labels: tuple[str, ...] | None = None
    extra: Any = None
    negatives: tuple[str, ...] | None = None


@dataclass
class Loaded:
    image: bytes
    mask: np.ndarray | None
    labels: tuple[str, ...]
    negatives: tuple[str, ...] | None = None


class Source(Protocol):
    class_names: list[str]

    def entries(self): ...

    def load(self, entry: Entry) -> Loaded: ...


class BadEntry(ValueError):
    """An unusable input: ``code`` groups rejects for counting, the message says what is wrong."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def labels_from_mask(mask: np.ndarray, class_names: list[str]) -> tuple[str, ...]:
    values = np.unique(mask)
    bad = [int(v) for v in values if v != 255 and v > len(class_names)]
    if bad:
        raise BadEntry("mask_values", f"mask has values {bad} outside 0..{len(class_names)} and 255")
    return tuple(class_names[int(v) - 1] for v in values if 0 < v <= len(class_names))


def class_list(classes: list[str], base: str) -> list[str]:
    """``source.classes`` with each ``@<file>`` item replaced by the names the file lists.

    The file holds one name a line, or CSV rows whose first column is the name (OpenImages'
    ``class-descriptions-boxable.csv``: MID, display name); a ``LabelName`` header is skipped. A
    relative path is relative to ``base`` (the dataset root or the manifest's folder).
    """
    import csv
    import io
    from pathlib import PurePosixPath

    from system import storage

    names: list[str] = []
    for item in classes:
        if not item.startswith("@"):
            names.append(item)
            continue
        path = item[1:]
        if not (storage.is_s3(path) or PurePosixPath(path).is_absolute()):
            path = storage.join(base, path)
        try:
            text = storage.get_bytes(path).decode("utf-8-sig")
        except FileNotFoundError:
            raise FileNotFoundError(f"source.classes: class list file {path} not found") from None
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row and row[0].strip()]
        names.extend(row[0].strip() for row in rows if row[0].strip() != "LabelName")
    return names


def build_source(cfg: SourceConfig) -> Source:
    from system.data.sources import coco, manifest, openimages, synthetic, voc, webdataset

    builders = {
        "voc": voc.VocSource,
        "coco": coco.CocoSource,
        "openimages": openimages.OpenImagesSource,
        "manifest": manifest.ManifestSource,
        "webdataset": webdataset.WebDatasetSource,
        "synthetic": synthetic.SyntheticSource,
    }
    if cfg.format != "synthetic" and not cfg.path:
        raise ValueError(f"source.path is required for source.format={cfg.format}")
    return builders[cfg.format](cfg)
