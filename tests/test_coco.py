"""COCO GT masks are pycocotools' own: every instance equals ``COCO.annToMask`` and the semantic mask
is those instances under the source's overlap rule (crowd first as ignore, then larger under smaller)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from system.data.sources import BadEntry, SourceConfig, build_source
from system.data.sources.coco import instance_mask, rasterise

H, W = 60, 80


def _plain_rle(region: np.ndarray) -> dict:
    """Uncompressed RLE (column-major runs, zeros first), as COCO's crowd annotations are written."""
    flat = region.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(region.shape), "counts": ([0] if flat[0] else []) + runs}


def _compressed_rle(region: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ring_parts(cx: float, cy: float, outer: float, inner: float) -> list[list[float]]:
    """A ring as two C-shaped parts (the way COCO draws an object with a hole): left and right halves."""
    parts = []
    for side in (-1, 1):
        angles = np.linspace(-np.pi / 2, np.pi / 2, 9)
        outer_arc = [(cx + side * outer * np.cos(a), cy + outer * np.sin(a)) for a in angles]
        inner_arc = [(cx + side * inner * np.cos(a), cy + inner * np.sin(a)) for a in angles[::-1]]
        parts.append([round(float(v), 2) for point in outer_arc + inner_arc for v in point])
    return parts


def _annotations() -> list[dict]:
    crowd = np.zeros((H, W), bool)
    crowd[40:58, 2:30] = True
    crowd_compressed = np.zeros((H, W), bool)
    crowd_compressed[::3, 60:78] = True
    blob = np.zeros((H, W), bool)
    blob[5:20, 55:75] = True
    blob[10:15, 60:65] = False
    anns = [
        # category 3: a ring (hole in the middle) from two polygon parts with sub-pixel coordinates
        (1, 3, 0, _ring_parts(30.3, 25.7, 18.4, 7.9)),
        # category 1: a triangle overlapping the ring, smaller, so painted on top
        (1, 1, 0, [[25.5, 10.25, 48.75, 30.5, 20.1, 33.9]]),
        # category 9: crowd, uncompressed counts
        (1, 9, 1, _plain_rle(crowd)),
        # category 4: crowd, compressed counts, partly under the ring
        (1, 4, 1, _compressed_rle(crowd_compressed)),
        # category 7: an individual instance given as compressed RLE, with a hole
        (1, 7, 0, _compressed_rle(blob)),
        # second image: an individual instance as uncompressed RLE overlapping a polygon
        (2, 7, 0, _plain_rle(blob)),
        (2, 1, 0, [[50.0, 0.0, 79.0, 0.0, 79.0, 25.0, 50.0, 25.0]]),
    ]
    out = []
    for i, (image_id, category_id, iscrowd, segmentation) in enumerate(anns, start=1):
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, H, W))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, H, W)
        else:
            rle = segmentation
        out.append(
            {
                "id": i,
                "image_id": image_id,
                "category_id": category_id,
                "iscrowd": iscrowd,
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "segmentation": segmentation,
            }
        )
    return out


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images = []
    for image_id in (1, 2):
        name = f"{image_id:012d}.jpg"
        out = io.BytesIO()
        Image.new("RGB", (W, H), (90, 120, 150)).save(out, format="JPEG")
        (tmp_path / "val2017" / name).write_bytes(out.getvalue())
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
    categories = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in (7, 1, 9, 4, 3)]
    data = {"images": images, "annotations": _annotations(), "categories": categories}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return tmp_path


def test_every_instance_equals_pycocotools_ann_to_mask(coco_root):
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert {type(a["segmentation"]).__name__ for a in anns} == {"list", "dict"}
    for ann in anns:
        expected = coco.annToMask(ann).astype(bool)
        assert expected.any()
        np.testing.assert_array_equal(instance_mask(ann["segmentation"], H, W), expected, err_msg=f"ann {ann['id']}")
    ring = coco.annToMask(anns[0])
    assert ring[26, 30] == 0 and ring[26, 15] == 1, "the ring's two parts leave its middle open"


def test_semantic_masks_equal_ann_to_mask_under_the_overlap_rule(coco_root):
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    order = {c: i for i, c in enumerate(sorted(coco.getCatIds()))}
    source = build_source(SourceConfig(format="coco", path=str(coco_root), split="val2017"))
    entries = list(source.entries())
    assert [e.id for e in entries] == ["000000000001", "000000000002"]
    for image_id, entry in zip((1, 2), entries):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        expected = np.zeros((H, W), np.uint8)
        for ann in sorted(anns, key=lambda a: (not a["iscrowd"], -a["area"])):
            expected[coco.annToMask(ann) == 1] = 255 if ann["iscrowd"] else order[ann["category_id"]] + 1
        got = source.load(entry).mask
        np.testing.assert_array_equal(got, expected)
        assert len(np.unique(got)) >= 3, "the overlaps are really exercised"
    first = source.load(entries[0]).mask
    assert first[47, 10] == 255, "crowd regions are ignore"
    assert first[20, 30] == order[1] + 1, "the smaller triangle is painted over the ring"


def test_crowd_is_ignore_under_individual_instances_and_small_over_large():
    big = [[0, 0, 20, 0, 20, 20, 0, 20]]
    small = [[5, 5, 10, 5, 10, 10, 5, 10]]
    crowd = np.zeros((20, 20), dtype=bool)
    crowd[15:, 15:] = True
    crowd_rle = _compressed_rle(crowd)
    mask = rasterise(20, 20, [[1, 0, 25.0, small], [0, 0, 400.0, big], [2, 1, 25.0, crowd_rle]])
    assert mask[2, 2] == 1 and mask[7, 7] == 2, "the small instance stays visible on the large one"
    assert mask[17, 17] == 1, "individual instances are painted over crowd regions"
    no_instance = rasterise(20, 20, [[2, 1, 25.0, crowd_rle]])
    assert no_instance[17, 17] == 255 and no_instance[0, 0] == 0


@pytest.mark.parametrize(
    "segmentation, code",
    [
        ({"size": [H, W], "counts": [10, 5]}, "bad_segmentation"),  # counts stop short of H*W
        ({"size": [H, W], "counts": [H * W - 5, 10]}, "bad_segmentation"),  # counts overrun
        ({"size": [H, W], "counts": "zzzz"}, "bad_segmentation"),
        ({"size": [H, W], "counts": ""}, "bad_segmentation"),
        ({"size": [W, H], "counts": [H * W]}, "mask_size"),
        ([[1.0, 2.0]], "bad_segmentation"),
        ({"counts": [H * W]}, "mask_size"),
        ("not a segmentation", "bad_segmentation"),
    ],
)
def test_malformed_segmentations_are_clear_rejects(segmentation, code):
    with pytest.raises(BadEntry) as info:
        instance_mask(segmentation, H, W)
    assert info.value.code == code
