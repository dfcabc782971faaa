"""Exports of a finished labelling job: COCO RLE annotations that pycocotools decodes to exactly the mask
PNGs, Label Studio tasks in its pre-annotation schema whose brush RLE decodes to the same masks.

The labelling job is real (SeaweedFS, local Ray, tiny model, one unreadable image) and runs once per
module with ``export=coco,labelstudio``; a second export of it through ``pipelines.export`` cuts it
into several chunks. The brush RLE is checked with a decoder written here from the rle-pack format.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipelines import export as export_pipeline
from pipelines.export import ExportConfig
from pipelines.label import run_complete
from system import storage
from system.data.shards import unescape_key
from system.label.brush import encode_brush_rle, mask_to_brush_rle
from system.label.config import LabelConfig
from system.label.exports import ExportJob, ExportSpec, check_image_name, parse_formats
from system.masks import mask_codec
from tests.test_label import NAMES, export_tiny, synthetic_sample, write_dataset

CODEC = mask_codec("png")


def decode_brush_rle(rle: list[int]) -> np.ndarray:
    """thi.ng rle-pack's decode, as Label Studio's editor runs it."""
    bits = np.unpackbits(np.array(rle, dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = int("".join(map(str, bits[pos : pos + n])) or "0", 2)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(widths[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for n in range(i, j):
                out[n] = read(word)
        i = j
    return out


def test_brush_rle_matches_the_format_bit_for_bit_on_a_small_mask():
    # 1x2 mask [painted, empty] -> RGBA bytes 255 x4, 0 x4: header (8 values, word 8, widths 3/4/8/16), two
    # repeat chunks of 4 in the 3-bit width, then zero bits to the byte boundary
    bits = f"{8:032b}" + "00111" + "0010" + "0011" + "0111" + "1111"
    bits += "1" + "00" + "011" + "11111111" + "1" + "00" + "011" + "00000000"
    bits += "0" * (8 - len(bits) % 8)
    expected = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    assert mask_to_brush_rle(np.array([[True, False]])) == expected


@pytest.mark.parametrize("case", ["random", "single_values", "long_runs", "empty", "all_one_value"])
def test_brush_rle_decodes_back_to_its_input(case):
    rng = np.random.default_rng(1)
    values = {
        "random": np.repeat(rng.integers(0, 2, 3000).astype(np.uint8) * 255, rng.integers(1, 40, 3000)),
        "single_values": rng.integers(0, 256, 500).astype(np.uint8),
        "long_runs": np.concatenate([np.full(70000, 255), np.full(131072, 0), np.full(65537, 255), [7]]),
        "empty": np.zeros(0, np.uint8),
        "all_one_value": np.full(200_000, 255),
    }[case].astype(np.uint8)
    np.testing.assert_array_equal(decode_brush_rle(encode_brush_rle(values)), values)


def test_export_formats_and_image_templates_are_checked_up_front():
    assert parse_formats(" coco, labelstudio,coco") == ("coco", "labelstudio")
    with pytest.raises(ValueError, match="'yolo' not among coco, labelstudio"):
        parse_formats("coco,yolo")
    check_image_name("s3://b/images/{id}.jpg")
    with pytest.raises(ValueError, match="only {id}, {key} and {source}"):
        check_image_name("{name}.jpg")
    with pytest.raises(ValueError, match="export format"):
        LabelConfig(model="m", data="d", output="o", export="coco,pascal")
    with pytest.raises(ValueError, match="formats must name"):
        ExportConfig(job="j", formats=" , ")


def test_images_are_named_by_the_template_or_the_job_kinds_default():
    job = ExportJob("s3://b/job", "r", ("a",), "png", "dataset", "m", 1, 0)
    spec = ExportSpec(job, ("coco",), "s3://b/job/exports", "e", "", 1000)
    assert spec.image_reference("img_2f3", "img/3", "s3://b/data/shard-000000.tar") == "img/3.jpg"
    manifest = dataclasses.replace(spec, job=dataclasses.replace(job, kind="manifest"))
    assert manifest.image_reference("x", "x", "s3://b/raw/x.png") == "s3://b/raw/x.png"
    templated = dataclasses.replace(spec, image_name="/data/local-files/?d=imgs/{key}.jpg")
    assert templated.image_reference("img_2f3", "img/3", "") == "/data/local-files/?d=imgs/img_2f3.jpg"


@pytest.fixture(scope="module")
def exported_job(s3_bucket, ray_cluster):
    """A CAM job (its masks hold 255 where uncertain) over 9 images, one unreadable, exported when complete."""
    root = f"s3://{s3_bucket}/export-job-{os.getpid()}"
    samples = [synthetic_sample(i)[:2] for i in range(8)]
    meta = {"id": "broken", "labels": [0], "width": 64, "height": 64, "source": "test"}
    samples.append(("broken", [("jpg", b"\xff\xd8\xff\xe0 truncated"), ("json", json.dumps(meta).encode())]))
    write_dataset(f"{root}/data", samples, shard_size=4)
    cfg = LabelConfig(
        model=export_tiny(f"{root}/model"),
        data=f"{root}/data",
        output=f"{root}/out",
        mode="cam",
        cam_scales=[1.0],
        batch_size=3,
        num_actors=1,
        precision="fp32",
        num_previews=0,
        export="coco,labelstudio",
    )
    job = run_complete(cfg)
    return cfg, job


def _masks(cfg) -> dict[str, np.ndarray]:
    prefix = storage.join(cfg.output, "masks") + "/"
    return {
        uri[len(prefix) : -4]: CODEC.decode(storage.get_bytes(uri))
        for uri in storage.list_uris(prefix)
        if uri.endswith(".png")
    }


def _index(output: str, fmt: str) -> dict:
    index = json.loads(storage.get_bytes(storage.join(output, "exports", fmt, "index.json")))
    folder = storage.join(output, "exports", fmt)
    parts = sorted(u.rsplit("/", 1)[-1] for u in storage.list_uris(folder) if "/part-" in u)
    assert parts == sorted(index["parts"]), "the folder holds exactly the parts its index names"
    return index


def _coco_masks(output: str, tmp_path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every image's mask rebuilt from the COCO parts with pycocotools alone, by file_name."""
    index = _index(output, "coco")
    masks, images = {}, []
    ann_ids = set()
    for name in index["parts"]:
        path = tmp_path / name
        path.write_bytes(storage.get_bytes(storage.join(output, "exports", "coco", name)))
        coco = COCO(str(path))  # pycocotools' own loader (JSON)
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3, 255]
        for image in coco.loadImgs(coco.getImgIds()):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            mask = np.zeros((image["height"], image["width"]), np.uint8)
            for ann in anns:
                region = coco.annToMask(ann).astype(bool)
                assert not mask[region].any(), "one class per pixel: annotations do not overlap"
                assert ann["area"] == region.sum() and ann["iscrowd"] == int(ann["category_id"] == 255)
                assert ann["bbox"] == mask_utils.toBbox(coco.annToRLE(ann)).tolist()
                mask[region] = ann["category_id"]
                ann_ids.add(ann["id"])
            masks[image["file_name"]] = mask
            images.append(image)
    assert len(ann_ids) == index["annotations"]
    assert len({image["id"] for image in images}) == len(images) == index["images"]
    return masks, images


def _labelstudio_masks(output: str) -> dict[str, np.ndarray]:
    """Every task's mask rebuilt from its brush results; checks each task against the import schema."""
    index = _index(output, "labelstudio")
    config = storage.get_bytes(storage.join(output, "exports", "labelstudio", index["label_config"])).decode()
    assert '<BrushLabels name="label" toName="image">' in config and '<Image name="image" value="$image"' in config
    masks, result_ids = {}, []
    for name in index["parts"]:
        tasks = json.loads(storage.get_bytes(storage.join(output, "exports", "labelstudio", name)))
        assert isinstance(tasks, list)
        for task in tasks:
            assert set(task) == {"data", "predictions"} and isinstance(task["data"]["image"], str)
            (prediction,) = task["predictions"]
            assert isinstance(prediction["model_version"], str) and 0 < prediction["score"] <= 1
            mask = None
            for result in prediction["result"]:
                assert result["type"] == "brushlabels"
                assert (result["from_name"], result["to_name"], result["image_rotation"]) == ("label", "image", 0)
                h, w = result["original_height"], result["original_width"]
                value = result["value"]
                assert value["format"] == "rle" and all(0 <= b <= 255 for b in value["rle"])
                (label,) = value["brushlabels"]
                layer = decode_brush_rle(value["rle"]).reshape(h, w, 4)
                assert (layer == layer[..., 3:]).all(), "every RGBA channel carries the same paint"
                mask = np.zeros((h, w), np.uint8) if mask is None else mask
                assert not mask[layer[..., 3] > 0].any()
                mask[layer[..., 3] > 0] = NAMES.index(label) + 1
                result_ids.append(result["id"])
            masks[task["data"]["mask_key"]] = mask
    assert len(result_ids) == len(set(result_ids)) == index["results"]
    return masks


def test_coco_export_decodes_with_pycocotools_to_exactly_the_mask_pngs(exported_job, tmp_path):
    cfg, job = exported_job
    assert job["counts"]["failed"] == 1 and job["counts"]["masks"] == 8
    pngs = _masks(cfg)
    assert any((m == 255).any() for m in pngs.values()), "the CAM masks hold uncertain pixels to export"
    coco_masks, images = _coco_masks(cfg.output, tmp_path)
    by_file = {f"{unescape_key(key)}.jpg": mask for key, mask in pngs.items()}  # a dataset job: {id}.jpg
    assert sorted(coco_masks) == sorted(by_file), "every mask once, the failed image skipped"
    for name, mask in by_file.items():
        np.testing.assert_array_equal(coco_masks[name], mask, err_msg=name)
    assert all((im["width"], im["height"]) == (64, 64) for im in images)
    index = _index(cfg.output, "coco")
    assert index["failed_in_job"] == 1 and index["job_run"] == job["run"] and len(index["parts"]) == 1


def test_labelstudio_export_is_the_pre_annotation_schema_and_its_brushes_are_the_masks(exported_job):
    cfg, _ = exported_job
    pngs = _masks(cfg)
    tasks = _labelstudio_masks(cfg.output)
    assert sorted(tasks) == sorted(pngs) and "broken" not in tasks
    for key, mask in pngs.items():
        expected = np.where(mask == 255, 0, mask)  # uncertain pixels are left for the reviewer
        got = tasks[key] if tasks[key] is not None else np.zeros_like(mask)
        np.testing.assert_array_equal(got, expected, err_msg=key)


def test_export_entry_point_writes_chunked_parts_and_replaces_an_earlier_export(exported_job, tmp_path):
    cfg, _ = exported_job
    output = cfg.output + "-elsewhere"
    args = [f"job={cfg.output}", f"output={output}", "chunk_size=3", "num_workers=2", "image_name=imgs/{key}.jpg"]
    export_pipeline.main(args)
    first = _index(output, "coco")
    assert len(first["parts"]) == 3 and first["images"] == 8  # 8 masks in chunks of 3
    export_pipeline.main([*args[:-1], "image_name=s3://b/{id}.png", "formats=coco"])
    second = _index(output, "coco")
    assert second["export_run"] != first["export_run"] and not set(second["parts"]) & set(first["parts"])
    coco_masks, images = _coco_masks(output, tmp_path)
    pngs = _masks(cfg)
    assert sorted(coco_masks) == sorted(f"s3://b/{unescape_key(key)}.png" for key in pngs)
    assert sorted(im["id"] for im in images) == list(range(1, 9))
    for key, mask in pngs.items():
        np.testing.assert_array_equal(coco_masks[f"s3://b/{unescape_key(key)}.png"], mask)
    assert _index(output, "labelstudio")["export_run"] == first["export_run"], "formats not asked for stay"


def test_a_bad_output_uri_or_an_unfinished_job_stops_with_a_clear_error(exported_job, s3_root, capsys):
    cfg, _ = exported_job
    cases = [
        ([f"job={cfg.output}", "output=s3://no-such-bucket-here/x"], "bucket 'no-such-bucket-here' does not exist"),
        ([f"job={cfg.output}", "output=https://example.com/x"], "not an s3:// URI or a local path"),
        ([f"job={s3_root}/nothing"], "no label_job.json, so not a finished labelling job"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            export_pipeline.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    job = json.loads(storage.get_bytes(storage.join(cfg.output, "label_job.json")))
    storage.put_bytes(f"{s3_root}/partial/label_job.json", json.dumps({**job, "complete": False}).encode())
    with pytest.raises(ValueError, match="the labelling job is incomplete"):
        export_pipeline.run(ExportConfig(job=f"{s3_root}/partial"))
