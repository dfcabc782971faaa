"""Ingest end to end on a real local Ray cluster, writing to a real S3 server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest import IngestConfig, run
from system import storage
from system.config import ConfigError, load_config
from system.data.shards import DatasetInfo, escape_id, read_dataset
from system.data.sources import SourceConfig
from system.data.sources.voc import VOC_CLASSES
from system.telemetry import REGISTRY
from tests import ingest_inputs as inputs

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _ingest(output: str, shard_size: int = 4, **source) -> DatasetInfo:
    return run(
        IngestConfig(
            output=output, source=SourceConfig(**source), shard_size=shard_size, num_workers=2, progress_every_s=0.0
        )
    )


def _check_counts(info: DatasetInfo, samples: dict) -> None:
    assert info.total_samples == len(samples) == sum(s.samples for s in info.shards)
    assert info.total_samples + info.rejected.total == info.inputs


def test_voc_layout_masks_and_xml_labels(tmp_path, s3_root):
    truth = inputs.make_voc(tmp_path / "VOC2012", n=10)
    info = _ingest(s3_root, format="voc", path=str(tmp_path / "VOC2012"), split="train")
    samples = inputs.read_samples(s3_root)
    _check_counts(info, samples)
    assert info.classes == VOC_CLASSES and info.total_samples == 10 and info.samples_with_masks == 5
    assert not info.partial_labels and "partial_labels" not in json.loads(info.encode())
    assert [s.name for s in info.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for sample_id, (classes, mask) in truth.items():
        sample = samples[escape_id(sample_id)]
        meta, got_mask, size = inputs.sample_truth(sample)
        assert meta["id"] == sample_id and meta["labels"] == classes and (meta["width"], meta["height"]) == size
        assert "known" not in meta  # complete labels: every class known, the sample as before
        assert sample["jpg"] == (tmp_path / "VOC2012" / "JPEGImages" / f"{sample_id}.jpg").read_bytes()
        if mask is None:
            assert got_mask is None
        else:
            np.testing.assert_array_equal(got_mask, mask)


def test_voc_authors_label_file_and_id_list(tmp_path, s3_root):
    root = tmp_path / "VOC2012"
    truth = inputs.make_voc(root, n=6)
    ids = list(truth)[:4]
    table = {
        i: np.isin(np.arange(20), [k for k in range(20) if k in truth[i][0]] + [19]).astype(np.float32) for i in ids
    }
    np.save(tmp_path / "cls_labels.npy", table)
    (tmp_path / "train_aug_id.txt").write_text("\n".join(ids) + "\n")
    info = _ingest(
        s3_root,
        format="voc",
        path=str(root),
        ids_file=str(tmp_path / "train_aug_id.txt"),
        labels_file=str(tmp_path / "cls_labels.npy"),
        masks=False,
    )
    samples = inputs.read_samples(s3_root)
    assert info.total_samples == 4 and info.samples_with_masks == 0
    for i in ids:
        meta = json.loads(samples[escape_id(i)]["json"])
        assert meta["labels"] == sorted(set(truth[i][0]) | {19}), "labels come from the .npy, not the masks"


def test_coco_tags_contiguous_classes_and_rasterised_masks(tmp_path, s3_root):
    truth, cat_ids = inputs.make_coco(tmp_path / "coco")
    info = _ingest(s3_root, format="coco", path=str(tmp_path / "coco"), split="train2017")
    samples = inputs.read_samples(s3_root)
    _check_counts(info, samples)
    assert info.classes == [f"cat{c}" for c in sorted(cat_ids)]
    assert info.rejected.by_code == {"no_labels": 1}
    order = {c: i for i, c in enumerate(sorted(cat_ids))}
    for sample_id, (classes, mask) in truth.items():
        if not classes:
            assert escape_id(sample_id) not in samples
            continue
        meta, got_mask, _ = inputs.sample_truth(samples[escape_id(sample_id)])
        assert meta["labels"] == sorted(order[cat_ids[k]] for k in classes) and "known" not in meta
        expected = np.zeros_like(mask)
        for k in classes:
            expected[mask == k + 1] = order[cat_ids[k]] + 1
        np.testing.assert_array_equal(got_mask, expected)


def test_openimages_verified_positives_and_class_subset(tmp_path, s3_root):
    truth = inputs.make_openimages(tmp_path / "oi")
    info = _ingest(
        s3_root, format="openimages", path=str(tmp_path / "oi"), split="train", classes=["Class 3", "/m/01x", "Class 0"]
    )
    samples = inputs.read_samples(s3_root)
    _check_counts(info, samples)
    assert info.classes == ["Class 3", "Class 1", "Class 0"]
    subset = {3: 0, 1: 1, 0: 2}
    for image_id, classes in truth.items():
        kept = sorted(subset[k] for k in classes if k in subset)
        if not kept:
            assert escape_id(image_id) not in samples
        else:
            assert json.loads(samples[escape_id(image_id)]["json"])["labels"] == kept
    assert info.rejected.by_code == {"no_labels": sum(1 for c in truth.values() if not set(c) & set(subset))}


def test_manifest_on_s3_with_relative_and_s3_image_paths(s3_root):
    lines, truth = [], {}
    for i in range(6):
        image, _, classes = inputs.scene(300 + i)
        location = f"images/{i}.jpg" if i % 2 else storage.join(s3_root, "elsewhere", f"{i}.jpg")
        storage.put_bytes(storage.join(s3_root, "in", location) if i % 2 else location, image)
        names = [f"thing{k}" for k in classes]
        lines.append(json.dumps({"id": f"img {i}", "image": location, "labels": names}))
        truth[f"img {i}"] = names
    storage.put_bytes(storage.join(s3_root, "in", "manifest.jsonl"), ("\n".join(lines) + "\n").encode())
    out = storage.join(s3_root, "out")
    info = _ingest(out, format="manifest", path=storage.join(s3_root, "in", "manifest.jsonl"))
    samples = inputs.read_samples(out)
    _check_counts(info, samples)
    assert info.classes == sorted({n for names in truth.values() for n in names})
    for sample_id, names in truth.items():
        meta = json.loads(samples[escape_id(sample_id)]["json"])
        assert meta["id"] == sample_id and [info.classes[k] for k in meta["labels"]] == sorted(names)


def _encoded(array, fmt="JPEG", mode=None) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_bad_inputs_are_rejected_with_reasons_and_counts_add_up(tmp_path, s3_root):
    rgb = (np.random.default_rng(3).random((40, 40, 3)) * 255).astype(np.uint8)
    good = _encoded(rgb)
    files = {
        "good.jpg": good,
        "zero.jpg": b"",
        "trunc.jpg": good[: len(good) // 2],
        "garbage.jpg": np.random.default_rng(4).bytes(2000),
        "notes.txt": b"just text",
        "cmyk.jpg": _encoded(rgb, mode="CMYK"),
        "grey.jpg": _encoded(rgb, mode="L"),
        "alpha.png": _encoded(rgb, "PNG", "RGBA"),
        "old.bmp": _encoded(rgb, "BMP"),
        "deep.png": _encoded(rgb[..., 0].astype(np.uint16) * 250, "PNG"),
        "huge.png": _encoded(np.zeros((100, 100, 3), np.uint8), "PNG"),
        "mask_small.png": _encoded(np.zeros((20, 20), np.uint8), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = [
        ("good", "good.jpg", ["a"], None, None),
        ("zero", "zero.jpg", ["a"], None, "empty"),
        ("trunc", "trunc.jpg", ["a"], None, "corrupt"),
        ("garbage", "garbage.jpg", ["a"], None, "unreadable"),
        ("text", "notes.txt", ["a"], None, "unreadable"),
        ("cmyk", "cmyk.jpg", ["a"], None, None),
        ("grey", "grey.jpg", ["a"], None, None),
        ("alpha", "alpha.png", ["b"], None, None),
        ("bmp", "old.bmp", ["b"], None, None),
        ("deep", "deep.png", ["a"], None, None),
        ("huge", "huge.png", ["a"], None, "too_large"),
        ("unknown", "good.jpg", ["a", "zebra"], None, "unknown_class"),
        ("nolabel", "good.jpg", [], None, "no_labels"),
        ("good", "grey.jpg", ["a"], None, "duplicate_id"),
        ("../x", "good.jpg", ["a"], None, "unsafe_id"),
        ("/", "good.jpg", ["a"], None, "unsafe_id"),
        ("with space", "good.jpg", ["a"], None, None),
        ("ünï", "good.jpg", ["b"], None, None),
        ("badmask", "good.jpg", ["a"], "mask_small.png", "mask_size"),
        ("missing", "absent.jpg", ["a"], None, "not_found"),
    ]
    lines = [
        json.dumps({"id": i, "image": img, "labels": lab} | ({"mask": m} if m else {})) for i, img, lab, m, _ in rows
    ]
    lines.insert(3, "{not json")
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")

    run_name = s3_root.rsplit("/", 1)[-1]

    def counted(code: str) -> float:
        return REGISTRY.get_sample_value("clustercam_ingest_rejects_total", {"run": run_name, "code": code}) or 0

    before = {reason: counted(reason) for reason in ("too_large", "unsafe_id", "malformed")}
    info = run(
        IngestConfig(
            output=s3_root,
            source=SourceConfig(format="manifest", path=str(tmp_path / "manifest.jsonl"), classes=["a", "b"]),
            shard_size=5,
            max_pixels=5000,
            progress_every_s=0.0,
        )
    )
    samples = inputs.read_samples(s3_root)
    rejects = [
        json.loads(line) for line in storage.get_bytes(storage.join(s3_root, "rejects.jsonl")).decode().splitlines()
    ]
    assert info.inputs == len(rows) + 1
    assert info.total_samples + len(rejects) == info.inputs == info.total_samples + info.rejected.total
    got = {(r["id"], r["code"]) for r in rejects}
    expected = {(i, code) for i, _, _, _, code in rows if code} | {("", "malformed")}
    assert got == expected
    accepted = {escape_id(i) for i, _, _, _, code in rows if not code}
    assert set(samples) == accepted
    assert samples[escape_id("grey")]["jpg"] == files["grey.jpg"], "greyscale kept byte for byte"
    assert "png" in samples[escape_id("bmp")] and "bmp" not in samples[escape_id("bmp")]
    assert json.loads(samples[escape_id("ünï")]["json"])["id"] == "ünï"
    assert json.loads(samples[escape_id("cmyk")]["json"])["converted"] == ["cmyk->rgb"]
    assert json.loads(samples[escape_id("deep")]["json"])["converted"] == ["i16->l"]
    assert "converted" not in json.loads(samples[escape_id("grey")]["json"])
    assert {r: counted(r) - before[r] for r in before} == {"too_large": 1, "unsafe_id": 2, "malformed": 1}
    progress = [
        REGISTRY.get_sample_value(name, {"run": run_name})
        for name in ("clustercam_ingest_done_inputs_total", "clustercam_ingest_inputs")
    ]
    assert progress == [info.inputs, info.inputs], "the progress bar ends at 100%"


def test_rerun_skips_complete_shards_and_changes_nothing(s3_root, s3_server, caplog):
    _ingest(s3_root, shard_size=5, format="synthetic", num_images=14, image_size=48, num_classes=3)
    before = inputs.snapshot(s3_root)
    client = s3_server.client()
    bucket, prefix = s3_root[5:].split("/", 1)
    stamps = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    caplog.set_level("INFO", logger="pipelines.ingest")
    info = _ingest(s3_root, shard_size=5, format="synthetic", num_images=14, image_size=48, num_classes=3)
    assert "3 shards (3 already complete)" in caplog.text
    assert inputs.snapshot(s3_root) == before
    after = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert after == stamps, "nothing was rewritten"
    assert info == read_dataset(s3_root)


def test_changed_settings_rewrite_the_affected_shards(tmp_path):
    out = str(tmp_path / "ds")
    _ingest(out, shard_size=5, format="synthetic", num_images=10, image_size=48)
    first = read_dataset(out)
    second = _ingest(out, shard_size=5, format="synthetic", num_images=10, image_size=56)
    assert [s.sha256 for s in first.shards] != [s.sha256 for s in second.shards]
    assert read_dataset(out).source["image_size"] == 56


def test_killed_ingest_resumes_to_the_same_dataset(tmp_path, s3_root, ray_cluster):
    args = ["source.format=synthetic", "source.num_images=240", "source.image_size=64", "shard_size=4", "num_workers=1"]
    reference = storage.join(s3_root, "reference", "ds")
    _ingest(reference, shard_size=4, format="synthetic", num_images=240, image_size=64)
    target = storage.join(s3_root, "killed", "ds")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address_info["gcs_address"], PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.ingest", f"output={target}", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not any("_parts/" in u for u in storage.list_uris(target)):
        assert proc.poll() is None and time.monotonic() < deadline, "the ingest ended before writing a shard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [u for u in storage.list_uris(target) if "_parts/" in u]
    assert 0 < len(done) < 60 and not storage.exists(storage.join(target, "dataset.json")), "killed half-way"
    _ingest(target, shard_size=4, format="synthetic", num_images=240, image_size=64)
    ref, got = inputs.snapshot(reference), inputs.snapshot(target)

    def strip(snap, root):
        return {u[len(root) :]: b for u, b in snap.items() if not u.endswith("ingest.yaml")}

    assert strip(got, target) == strip(ref, reference)


def test_cli_config_names_bad_keys(tmp_path):
    with pytest.raises(ConfigError, match="source.formt"):
        load_config(IngestConfig, overrides=["output=/tmp/x", "source.formt=voc"])
    with pytest.raises(ConfigError, match="source.format"):
        load_config(IngestConfig, overrides=["output=/tmp/x", "source.format=imagenet"])
    cfg = load_config(
        IngestConfig,
        overrides=[
            "output=s3://b/d",
            "source.format=synthetic",
            "source.num_images=7",
            "source.num_classes=3",
            "source.image_size=64",
            "source.seed=2",
            "source.split=val",
            "source.path=",
            "shard_size=3",
            "num_workers=1",
        ],
    )
    assert (cfg.source.num_images, cfg.shard_size, cfg.output) == (7, 3, "s3://b/d")


def test_unwritable_output_fails_before_any_work(s3_server):
    with pytest.raises(storage.StorageError, match="s3://missing-bucket-x/ds.*does not exist"):
        _ingest("s3://missing-bucket-x/ds", format="synthetic", num_images=3)


@pytest.mark.parametrize("sorted_rows", [True, False], ids=["sorted", "unsorted"])
def test_openimages_partial_labels_follow_verified_negatives_and_the_hierarchy(
    tmp_path, s3_root, monkeypatch, sorted_rows
):
    from system.data.sources import openimages

    monkeypatch.setattr(openimages, "SORT_RUN_ROWS", 2)  # an unsorted file is merged from several runs
    inputs.make_openimages_partial(tmp_path / "oi", sorted_rows)
    hierarchy = str(tmp_path / "oi" / "bbox_labels_600_hierarchy.json")
    info = _ingest(s3_root, format="openimages", path=str(tmp_path / "oi"), hierarchy=hierarchy)
    assert info.classes == ["Animal", "Dog", "Cat", "Vehicle", "Car"]
    assert read_dataset(s3_root).partial_labels and info.extra == {"partial_labels": 3}
    samples = inputs.read_samples(s3_root)
    _check_counts(info, samples)
    meta = {key: json.loads(sample["json"]) for key, sample in samples.items()}
    # 0a: Dog (so Animal); Car verified absent; Cat and Vehicle unknown
    assert (meta["0a"]["labels"], meta["0a"]["known"]) == ([0, 1], [0, 1, 4])
    # 0b: Car (so Vehicle); Animal verified absent, so Dog and Cat are too
    assert (meta["0b"]["labels"], meta["0b"]["known"]) == ([3, 4], [0, 1, 2, 3, 4])
    # 0c: Cat (so Animal); the machine label leaves Vehicle unknown, the malformed row is dropped
    assert (meta["0c"]["labels"], meta["0c"]["known"]) == ([0, 2], [0, 2])
    rejects = [json.loads(line) for line in storage.get_bytes(storage.join(s3_root, "rejects.jsonl")).splitlines()]
    line = 2 + (5 if sorted_rows else 3)
    assert [(r["code"], r["id"], r["where"].rsplit("/", 1)[-1]) for r in rejects] == [
        ("malformed", "0c", f"oidv7-train-annotations-human-imagelabels.csv:{line}")
    ]


def test_openimages_without_a_hierarchy_keeps_the_rows_as_given_and_reads_classes_from_a_file(tmp_path, s3_root):
    inputs.make_openimages_partial(tmp_path / "oi", sorted_rows=True)
    (tmp_path / "boxable.csv").write_text("/m/r,Car\n/m/d,Dog\n")
    info = _ingest(s3_root, format="openimages", path=str(tmp_path / "oi"), classes=[f"@{tmp_path / 'boxable.csv'}"])
    assert info.classes == ["Car", "Dog"]
    meta = {k: json.loads(s["json"]) for k, s in inputs.read_samples(s3_root).items()}
    assert (meta["0a"]["labels"], meta["0a"]["known"]) == ([1], [0, 1])  # Dog; Car verified absent
    assert (meta["0b"]["labels"], meta["0b"]["known"]) == ([0], [0])  # Car; Animal's negative not expanded
    assert "0c" not in meta and info.rejected.by_code == {"malformed": 1, "no_labels": 1}


def test_openimages_csvs_are_found_by_name_or_named_in_the_error(tmp_path):
    from system.data.sources import build_source

    inputs.make_openimages_partial(tmp_path / "oi", sorted_rows=True)
    source = build_source(SourceConfig(format="openimages", path=str(tmp_path / "oi")))
    assert source.labels_file.endswith("oidv7-train-annotations-human-imagelabels.csv")
    with pytest.raises(FileNotFoundError, match="set source.labels_file"):
        build_source(SourceConfig(format="openimages", path=str(tmp_path / "oi"), split="validation"))
