"""Small input datasets in each supported layout, built from synthetic scenes (exact masks).

Synthetic class k plays VOC class k / the k-th COCO category / the k-th OpenImages class, so every
builder knows the true tags and masks of what it wrote. Builders return {id: (labels, mask or None)}.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from system import storage
from system.data.shards import read_dataset, shard_uris
from system.data.sources.synthetic import render
from system.data.sources.voc import VOC_CLASSES
from system.masks import decode_mask, encode_mask

SIZE = 64
NUM_CLASSES = 5


def scene(index: int) -> tuple[bytes, np.ndarray, list[int]]:
    return render(index, NUM_CLASSES, SIZE, seed=11)


def make_voc(root: Path, n: int = 10) -> dict:
    """First half with SegmentationClass masks, second half with Annotations XML only."""
    truth = {}
    ids = [f"2008_{i:06d}" for i in range(n)]
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, sample_id in enumerate(ids):
        image, mask, classes = scene(i)
        (root / "JPEGImages" / f"{sample_id}.jpg").write_bytes(image)
        if i < n // 2:
            (root / "SegmentationClass" / f"{sample_id}.png").write_bytes(encode_mask(mask))
            truth[sample_id] = (classes, mask)
        else:
            objects = "".join(
                f"<object><name>{VOC_CLASSES[k]}</name><difficult>0</difficult></object>" for k in classes
            )
            (root / "Annotations" / f"{sample_id}.xml").write_text(f"<annotation>{objects}</annotation>")
            truth[sample_id] = (classes, None)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return truth


def _polygons(mask: np.ndarray, value: int) -> list[list[float]]:
    """A box around each pixel row segment, in pixel-corner coordinates (pixel x spans x..x+1), which
    pycocotools rasterises to exactly those pixels."""
    polys = []
    for y in range(mask.shape[0]):
        xs = np.flatnonzero(mask[y] == value)
        if xs.size:
            breaks = np.flatnonzero(np.diff(xs) > 1)
            for seg in np.split(xs, breaks + 1):
                x0, x1 = float(seg[0]), float(seg[-1]) + 1
                polys.append([x0, y, x1, y, x1, y + 1, x0, y + 1])
    return polys


def make_coco(root: Path, n: int = 8) -> tuple[dict, list[int]]:
    """Category ids deliberately sparse and shuffled (ids 3, 1, 9, 4, 7) to test the ascending order."""
    cat_ids = [3, 1, 9, 4, 7]
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns, truth = [], [], {}
    for i in range(n):
        image, mask, classes = scene(100 + i)
        name = f"{i + 1:012d}.jpg"
        (root / "train2017" / name).write_bytes(image)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        if i == n - 1:
            truth[name[:-4]] = ([], None)  # no annotations at all: a "no labels" reject
            continue
        for k in classes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat_ids[k],
                    "iscrowd": 0,
                    "area": float((mask == k + 1).sum()),
                    "segmentation": _polygons(mask, k + 1),
                }
            )
        truth[name[:-4]] = (classes, mask)
    categories = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in cat_ids]
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    return truth, cat_ids


def make_openimages(root: Path, n: int = 8) -> dict:
    """Five classes; the last image has only a verified negative, and one row is a machine label."""
    mids = [f"/m/0{k}x" for k in range(NUM_CLASSES)]
    (root / "train").mkdir(parents=True)
    (root / "class-descriptions-boxable.csv").write_text("".join(f"{m},Class {k}\n" for k, m in enumerate(mids)))
    rows = ["ImageID,Source,LabelName,Confidence"]
    truth = {}
    for i in range(n):
        image_id = f"{i:016x}"
        image, _, classes = scene(200 + i)
        (root / "train" / f"{image_id}.jpg").write_bytes(image)
        if i == n - 1:
            rows.append(f"{image_id},verification,{mids[0]},0")
            truth[image_id] = []
            continue
        rows += [f"{image_id},verification,{mids[k]},1" for k in classes]
        missing = [k for k in range(NUM_CLASSES) if k not in classes][0]
        rows.append(f"{image_id},verification,{mids[missing]},0")
        truth[image_id] = classes
    (root / "train-annotations-human-imagelabels-boxable.csv").write_text("\n".join(rows) + "\n")
    return truth


def make_openimages_partial(root: Path, sorted_rows: bool) -> None:
    """Animal > {Dog, Cat}, Vehicle > Car; one malformed row and one machine label among the rows."""
    (root / "train").mkdir(parents=True)
    mids = {"Animal": "/m/a", "Dog": "/m/d", "Cat": "/m/c", "Vehicle": "/m/v", "Car": "/m/r"}
    (root / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f"{m},{n}\n" for n, m in mids.items())
    )
    tree = {
        "LabelName": "/m/0bl9f",
        "Subcategory": [
            {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/d"}, {"LabelName": "/m/c"}]},
            {"LabelName": "/m/v", "Subcategory": [{"LabelName": "/m/r"}], "Part": [{"LabelName": "/m/d"}]},
        ],
    }
    (root / "bbox_labels_600_hierarchy.json").write_text(json.dumps(tree))
    for i, image_id in enumerate(("0a", "0b", "0c")):
        (root / "train" / f"{image_id}.jpg").write_bytes(scene(400 + i)[0])
    rows = [
        "0a,verification,/m/d,1",
        "0a,verification,/m/r,0",
        "0b,verification,/m/a,0",
        "0b,verification,/m/r,1",
        "0c,verification,/m/c,1",
        "0c,verification,/m/d,not-a-number",
        "0c,machine,/m/v,0.7",
    ]
    if not sorted_rows:
        rows = [rows[4], rows[0], rows[2], rows[5], rows[6], rows[1], rows[3]]
    (root / "oidv7-train-annotations-human-imagelabels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n" + "\n".join(rows) + "\n"
    )


def read_samples(uri: str) -> dict[str, dict]:
    """Every sample of a dataset as {key: {ext: bytes}}, read straight from the tars."""
    info = read_dataset(uri)
    out: dict[str, dict] = {}
    for shard in shard_uris(uri, info):
        with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(shard))) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def sample_truth(sample: dict) -> tuple[dict, np.ndarray | None, tuple[int, int]]:
    meta = json.loads(sample["json"])
    image_ext = next(e for e in ("jpg", "png", "webp") if e in sample)
    size = Image.open(io.BytesIO(sample[image_ext])).size
    mask = decode_mask(sample["mask.png"]) if "mask.png" in sample else None
    return meta, mask, size


def snapshot(uri: str) -> dict[str, bytes]:
    return {u: storage.get_bytes(u) for u in storage.list_uris(uri)}
