"""A finished labelling job's masks in formats other tools read: COCO RLE annotations, Label Studio tasks.

Work comes in chunks of mask keys, taken from one streamed listing of ``masks/``; a chunk's masks are
read, decoded once and written as one part file per format, so memory stays one chunk deep wherever
the chunk runs and the driver holds a small record per chunk. Each mask is read through the job's
``MaskCodec``, whose embedded stats line gives the image's id, source and confidence. Images that
failed in the job have no mask and so are not exported.

Layout under ``<output>/exports/<format>/``::

    part-<export run>-<chunk>.json   one per chunk; complete files, each loadable on its own
    index.json                       written last: the parts of this export, counts, categories
    label_config.xml                 labelstudio: the labelling interface the tasks are made for

A part is written atomically and only ``index.json`` names it, so a killed export leaves the previous
index and its parts intact; the next complete export removes parts no index names.

- **coco**: the COCO stuff-segmentation form of the detection format (cocodataset.org/#format-data):
  ``images`` (``id``, ``file_name``, ``width``, ``height``), one ``annotations`` entry per image and
  class present with a compressed RLE ``segmentation``, ``area`` and ``bbox`` as pycocotools computes
  them, and ``categories``. A category's id is the value its pixels hold in the mask PNG (class k is
  k + 1), so painting each annotation with its ``category_id`` gives the PNG back; pixels the job left
  uncertain (255) are one ``iscrowd`` annotation of category 255 ``ignore``, which COCO evaluation and
  detectron2's training mapper leave out, as crowd regions. Image ids are ``chunk * chunk_size + n + 1``
  and annotation ids ``image id * 256 + category id``, unique across parts.
- **labelstudio**: Label Studio's JSON import: a list of tasks ``{"data": {"image": ...},
  "predictions": [{"model_version", "score", "result": [...]}]}``, one ``brushlabels`` result per class
  present (``value.format`` ``rle``, ``value.rle`` as ``system.label.brush`` encodes it). Uncertain
  pixels are left unpainted for the reviewer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from xml.sax.saxutils import quoteattr

import numpy as np
from pycocotools import mask as mask_utils

from system import storage
from system.label.brush import mask_to_brush_rle
from system.label.outputs import JOB_FILE
from system.masks import mask_codec
from system.refine import IGNORE_INDEX

EXPORT_FORMATS = ("coco", "labelstudio")
EXPORTS_DIR = "exports"
INDEX_FILE = "index.json"
LABEL_CONFIG_FILE = "label_config.xml"
IGNORE_CATEGORY = {"id": IGNORE_INDEX, "name": "ignore", "supercategory": "ignore"}
FROM_NAME, TO_NAME = "label", "image"  # the BrushLabels and Image tags of label_config.xml
_IMAGE_FIELDS = {"id": "x", "key": "x", "source": "x"}
_ERRORS_KEPT = 3


def parse_formats(text: str) -> tuple[str, ...]:
    """``"coco,labelstudio"`` -> ("coco", "labelstudio"); an unknown name is a ValueError naming it."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"export format(s) {', '.join(map(repr, unknown))} not among {', '.join(EXPORT_FORMATS)}")
    return names


def check_image_name(template: str) -> None:
    """Fail at start-up, not per image, on a template naming a field other than {id}, {key}, {source}."""
    try:
        template.format(**_IMAGE_FIELDS)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"image_name={template!r}: only {{id}}, {{key}} and {{source}} may appear ({exc})") from None


@dataclasses.dataclass(frozen=True)
class ExportJob:
    """What an export needs of a finished labelling job, from its ``label_job.json``."""

    uri: str
    run: str
    class_names: tuple[str, ...]
    mask_format: str
    kind: str  # "dataset" (images inside shards) | "manifest" (each image its own object)
    model_id: str
    mask_count: int
    failed: int

    @classmethod
    def read(cls, uri: str) -> ExportJob:
        where = storage.join(uri, JOB_FILE)
        try:
            job = json.loads(storage.get_bytes(where))
        except FileNotFoundError:
            raise ValueError(
                f"{uri}: no {JOB_FILE}, so not a finished labelling job (run python -m pipelines.label output={uri})"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if not job.get("complete"):
            raise ValueError(
                f"{uri}: the labelling job is incomplete ({JOB_FILE} says complete=false); re-run the same "
                "python -m pipelines.label command to finish it, then export"
            )
        try:
            return cls(
                uri=uri,
                run=str(job["run"]),
                class_names=tuple(job["model"]["class_names"]),
                mask_format=job["config"].get("mask_format", "png"),
                kind=job["dataset"]["kind"],
                model_id=str(job["model"].get("id") or job["model"]["uri"]),
                mask_count=int(job["counts"].get("masks", 0)),
                failed=int(job["counts"].get("failed", 0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: not a labelling job record (missing {exc})") from None

    @property
    def masks_uri(self) -> str:
        return storage.join(self.uri, "masks")

    def categories(self) -> list[dict]:
        return [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(self.class_names)] + [
            dict(IGNORE_CATEGORY)
        ]


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """Everything a chunk needs besides its keys; the same for every chunk of an export."""

    job: ExportJob
    formats: tuple[str, ...]
    output: str  # the exports folder: parts go to <output>/<format>/
    run: str
    image_name: str  # template over {id}, {key}, {source}; empty: the job kind's default
    chunk_size: int
    read_threads: int = 8

    def part_name(self, index: int) -> str:
        return f"part-{self.run}-{index:06d}.json"

    def image_reference(self, key: str, image_id: str, source: str) -> str:
        template = self.image_name or ("{source}" if self.job.kind == "manifest" else "{id}.jpg")
        return template.format(id=image_id, key=key, source=source)


@dataclasses.dataclass(frozen=True)
class ExportChunk:
    index: int
    keys: tuple[str, ...]


@dataclasses.dataclass
class ChunkResult:
    """What a chunk returns: per format its part's counts; masks it could not export (the first few, with why)."""

    index: int
    images: int
    entries: dict[str, int]  # format -> annotations (coco) or brush results (labelstudio) written
    failed: int
    errors: list[str]


@dataclasses.dataclass
class _Image:
    image_id: int
    key: str
    reference: str
    mask: np.ndarray
    score: float | None
    model: str


def _coco_entries(image: _Image, values: list[int]) -> tuple[dict, list[dict]]:
    height, width = image.mask.shape
    info = {"id": image.image_id, "file_name": image.reference, "width": width, "height": height}
    if not values:
        return info, []
    stack = np.asfortranarray(np.stack([image.mask == v for v in values], axis=-1).astype(np.uint8))
    rles = mask_utils.encode(stack)
    areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
    annotations = [
        {
            "id": image.image_id * 256 + v,
            "image_id": image.image_id,
            "category_id": v,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [float(x) for x in box],
            "iscrowd": int(v == IGNORE_INDEX),
        }
        for v, rle, area, box in zip(values, rles, areas, boxes)
    ]
    return info, annotations


def _labelstudio_task(image: _Image, values: list[int], class_names: tuple[str, ...]) -> dict:
    height, width = image.mask.shape
    results = [
        {
            "id": f"{image.image_id}-{v}",
            "type": "brushlabels",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(image.mask == v), "brushlabels": [class_names[v - 1]]},
        }
        for v in values
        if v != IGNORE_INDEX
    ]
    prediction = {"model_version": image.model, "result": results}
    if image.score is not None:
        prediction["score"] = image.score
    return {"data": {TO_NAME: image.reference, "mask_key": image.key}, "predictions": [prediction]}


def _read(uri: str) -> bytes | None:
    try:
        return storage.get_bytes(uri)
    except FileNotFoundError:
        return None


def export_chunk(spec: ExportSpec, chunk: ExportChunk) -> ChunkResult:
    """Write the chunk's part of every format; a transient storage fault is raised, so the chunk is retried."""
    codec = mask_codec(spec.job.mask_format)
    k = len(spec.job.class_names)
    uris = [storage.join(spec.job.masks_uri, key + codec.suffix) for key in chunk.keys]
    coco_images: list[dict] = []
    coco_annotations: list[dict] = []
    tasks: list[dict] = []
    errors: list[str] = []
    images = failed = 0
    with ThreadPoolExecutor(spec.read_threads) as pool:
        for n, (key, uri, data) in enumerate(zip(chunk.keys, uris, pool.map(_read, uris))):
            if data is None:
                continue  # removed since the listing (an overwrite re-run): not part of this job any more
            try:
                mask = codec.decode(data)
                line = codec.read_line(data) or {}
                values = [int(v) for v in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if v != 0]
                bad = [v for v in values if v > k and v != IGNORE_INDEX]
                if bad:
                    raise ValueError(f"values {bad} outside 0..{k} and {IGNORE_INDEX}")
            except (OSError, ValueError, SyntaxError) as exc:
                failed += 1
                if len(errors) < _ERRORS_KEPT:
                    errors.append(f"{uri}: not an exportable mask ({type(exc).__name__}: {exc})")
                continue
            image = _Image(
                image_id=chunk.index * spec.chunk_size + n + 1,
                key=key,
                reference=spec.image_reference(key, str(line.get("id", key)), str(line.get("source", ""))),
                mask=mask,
                score=line.get("confidence"),
                model=str(line.get("model") or spec.job.model_id),
            )
            images += 1
            if "coco" in spec.formats:
                info, annotations = _coco_entries(image, values)
                coco_images.append(info)
                coco_annotations.extend(annotations)
            if "labelstudio" in spec.formats:
                tasks.append(_labelstudio_task(image, values, spec.job.class_names))
    entries = {}
    if "coco" in spec.formats:
        part = {
            "info": {"description": f"clustercam pseudo labels of {spec.job.uri}", "version": spec.job.run},
            "images": coco_images,
            "annotations": coco_annotations,
            "categories": spec.job.categories(),
        }
        _put_json(storage.join(spec.output, "coco", spec.part_name(chunk.index)), part)
        entries["coco"] = len(coco_annotations)
    if "labelstudio" in spec.formats:
        _put_json(storage.join(spec.output, "labelstudio", spec.part_name(chunk.index)), tasks)
        entries["labelstudio"] = sum(len(t["predictions"][0]["result"]) for t in tasks)
    return ChunkResult(chunk.index, images, entries, failed, errors)


def _put_json(uri: str, value) -> None:
    storage.put_bytes(uri, json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def label_config(class_names: tuple[str, ...]) -> str:
    """The Label Studio labelling interface the exported tasks are made for (names must match)."""
    labels = "".join(f"    <Label value={quoteattr(name)}/>\n" for name in class_names)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
        f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}  </BrushLabels>\n'
        "</View>\n"
    )


def commit_index(spec: ExportSpec, fmt: str, results: list[ChunkResult]) -> dict:
    """Write ``index.json`` (the commit) for one format, then remove parts of earlier exports."""
    folder = storage.join(spec.output, fmt)
    ordered = sorted(results, key=lambda r: r.index)
    index = {
        "format": "clustercam-export",
        "version": 1,
        "kind": fmt,
        "job": spec.job.uri,
        "job_run": spec.job.run,
        "export_run": spec.run,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "images": sum(r.images for r in ordered),
        "annotations" if fmt == "coco" else "results": sum(r.entries[fmt] for r in ordered),
        "failed_in_job": spec.job.failed,
        "parts": [spec.part_name(r.index) for r in ordered],
    }
    if fmt == "coco":
        index["categories"] = spec.job.categories()
    else:
        index["label_config"] = LABEL_CONFIG_FILE
        storage.put_bytes(storage.join(folder, LABEL_CONFIG_FILE), label_config(spec.job.class_names).encode())
    storage.put_bytes(storage.join(folder, INDEX_FILE), (json.dumps(index, indent=1) + "\n").encode())
    keep = set(index["parts"])
    for uri in storage.list_uris(folder):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("part-") and name not in keep:
            storage.delete(uri)
    return index
