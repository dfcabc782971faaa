"""The labelling job end to end: real SeaweedFS, real local Ray, tiny model.

One seg job over a shard dataset is shared by several tests (it is the expensive part); the
kill-and-resume test runs the CLI as a separate driver process against the same Ray cluster and
SIGKILLs it half-way.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.evaluate import EvaluateConfig, evaluate
from pipelines.label import run
from system import storage
from system.cam import predict_probs
from system.label.config import LabelConfig
from system.label.infer import to_input
from system.label.inputs import ClassMismatch
from system.label.outputs import list_mask_keys
from system.masks import decode_mask, encode_mask, mask_codec
from system.metrics import ConfusionMatrix
from system.model import build_clustercam, export_model, load_clustercam
from tests.test_label import NAMES, TINY, K, export_tiny, jpeg, synthetic_sample, write_dataset
from workers.label import ACTOR_PORTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = [0.75, 1.0]


def _odd_samples():
    """A big image (capped for the model), a non-square one and an unreadable one."""
    rng = np.random.default_rng(7)
    out = []
    for key, (h, w) in (("big", (150, 230)), ("wide", (48, 80))):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        meta = {"id": key, "labels": [1], "width": w, "height": h, "source": "test"}
        gt = np.zeros((h, w), np.uint8)
        gt[: h // 2] = 2
        out.append((key, [("jpg", jpeg(pixels)), ("json", json.dumps(meta).encode()), ("mask.png", encode_mask(gt))]))
    meta = {"id": "broken", "labels": [0], "width": 64, "height": 64, "source": "test"}
    out.append(("broken", [("jpg", b"\xff\xd8\xff\xe0 truncated"), ("json", json.dumps(meta).encode())]))
    return out


@pytest.fixture(scope="module")
def seg_job(s3_bucket, ray_cluster):
    root = f"s3://{s3_bucket}/label-job-{os.getpid()}"
    samples = [synthetic_sample(i)[:2] for i in range(10)] + _odd_samples()
    write_dataset(f"{root}/data", samples, shard_size=4)
    model_uri = export_tiny(f"{root}/model")
    cfg = LabelConfig(
        model=model_uri,
        data=f"{root}/data",
        output=f"{root}/out",
        scales=SCALES,
        batch_size=3,
        num_actors=2,
        max_side=96,
        precision="fp32",
        num_previews=4,
        flush_every=4,
    )
    job = run(cfg)
    return cfg, job, samples


def _read_mask(cfg, key, folder="masks"):
    return decode_mask(storage.get_bytes(storage.join(cfg.output, folder, f"{key}.png")))


def test_seg_job_masks_match_predict_probs_and_the_contract(seg_job):
    cfg, job, samples = seg_job
    model = load_clustercam(cfg.model)
    good = [key for key, _ in samples if key != "broken"]
    assert list_mask_keys(storage.join(cfg.output, "masks")) == set(good)
    for key, members in samples:
        if key == "broken":
            continue
        parts = dict(members)
        meta = json.loads(parts["json"])
        mask = _read_mask(cfg, key)
        assert mask.shape == (meta["height"], meta["width"])
        assert set(np.unique(mask)) <= {0, *[k + 1 for k in meta["labels"]]}  # tags restrict seg masks
        if key in ("big",):
            continue  # resized for the model: compared in test_label.py
        pixels = np.array(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
        with torch.no_grad():
            probs = predict_probs(model, to_input(pixels)[None], SCALES)[0]
        allowed = torch.zeros(K + 1)
        allowed[[0, *[k + 1 for k in meta["labels"]]]] = 1
        np.testing.assert_array_equal(mask, (probs * allowed[:, None, None]).argmax(0).numpy())


def test_seg_job_reports_failures_stats_eval_and_previews(seg_job):
    cfg, job, samples = seg_job
    counts = job["counts"]
    assert counts == {
        "input": 13,
        "seen": 13,
        "written": 12,
        "skipped_existing": 0,
        "failed": 1,
        "masks": 12,
        "missing": 0,
        "not_reached": 0,
        "units_lost": 0,
    }
    assert job["complete"] and job["failures"][0]["key"] == "broken"
    assert job["failures"][0]["reason"].startswith("unreadable image")
    failure_lines = [
        json.loads(line)
        for uri in storage.list_uris(storage.join(cfg.output, "failures"))
        for line in storage.get_bytes(uri).decode().splitlines()
    ]
    assert [f["key"] for f in failure_lines] == ["broken"]
    stored = json.loads(storage.get_bytes(storage.join(cfg.output, "label_job.json")))
    assert stored["run"] == job["run"] and stored["model"]["class_names"] == NAMES
    lines = [
        json.loads(line)
        for uri in storage.list_uris(storage.join(cfg.output, "stats"))
        for line in storage.get_bytes(uri).decode().splitlines()
    ]
    assert sorted(line["key"] for line in lines) == sorted(key for key, _ in samples if key != "broken")
    line = next(line for line in lines if line["key"] == "big")
    assert line["model"] == "tiny-0" and line["id"] == "big" and (line["width"], line["height"]) == (230, 150)
    assert line["model_size"] == [96, 63] and abs(sum(line["fractions"].values()) - 1) < 1e-4
    assert 0 < line["confidence"] <= 1 and set(line["classes"]) <= {NAMES[1]}
    direct = ConfusionMatrix(K + 1)
    for key, members in samples:
        parts = dict(members)
        if key != "broken":
            direct.add(decode_mask(parts["mask.png"]), _read_mask(cfg, key))
    assert job["eval"]["seg"]["miou"] == pytest.approx(direct.miou(), abs=1e-12)
    assert job["eval"]["seg"]["images"] == 12
    result = evaluate(EvaluateConfig(masks=storage.join(cfg.output, "masks"), data=cfg.data))
    assert result["miou"] == pytest.approx(direct.miou(), abs=1e-12) and result["missing_masks"] == 0
    summed = evaluate(EvaluateConfig(job=cfg.output, missing_as_wrong=False))
    assert summed["from"] == "unit records" and summed["missing_masks"] == 1, "the failed image has no mask"
    assert summed["miou"] == pytest.approx(direct.miou(), abs=1e-12) and summed["images"] == 12
    quality = json.loads(storage.get_bytes(storage.join(cfg.output, "quality.json")))
    assert quality["modes"]["seg"]["images"] == 12 and job["quality"] == "quality.json"
    previews = storage.list_uris(storage.join(cfg.output, "previews"))
    assert len(previews) == 5 and any(p.endswith("contact_sheet.png") for p in previews)
    sheet = Image.open(io.BytesIO(storage.get_bytes(next(p for p in previews if p.endswith("contact_sheet.png")))))
    assert sheet.size[0] >= 320 and sheet.mode == "RGB"


def test_class_mismatch_stops_before_anything_runs(s3_root, ray_cluster):
    write_dataset(f"{s3_root}/data", [synthetic_sample(i)[:2] for i in range(2)])
    model_uri = export_tiny(f"{s3_root}/model", names=None)
    export_model(build_clustercam(**{**TINY, "num_classes": 4}), f"{s3_root}/model4")
    cfg = LabelConfig(model=f"{s3_root}/model4", data=f"{s3_root}/data", output=f"{s3_root}/out")
    with pytest.raises(ClassMismatch, match="3 classes but the model has 4"):
        run(cfg)
    assert storage.list_uris(f"{s3_root}/out") == []
    renamed = LabelConfig(model=model_uri, data=f"{s3_root}/data", output=f"{s3_root}/out", class_names=["a", "b", "c"])
    with pytest.raises(ClassMismatch, match="class names differ"):
        run(renamed)


def test_manifest_both_modes_with_gt(s3_root, ray_cluster):
    rows, gts = [], {}
    for i in range(3):
        key, members, gt, classes = synthetic_sample(20 + i)
        storage.put_bytes(f"{s3_root}/images/{i}.jpg", dict(members)["jpg"])
        storage.put_bytes(f"{s3_root}/gt/{i}.png", encode_mask(gt))
        rows.append(
            {"id": f"m{i}", "image": f"images/{i}.jpg", "mask": f"gt/{i}.png", "labels": [NAMES[k] for k in classes]}
        )
        gts[f"m{i}"] = gt
    rows.append({"id": "gone", "image": "images/missing.jpg", "labels": []})
    storage.put_bytes(f"{s3_root}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    model_uri = export_tiny(f"{s3_root}/model")
    port = _free_port()
    cfg = LabelConfig(
        model=model_uri,
        data=f"{s3_root}/manifest.jsonl",
        output=f"{s3_root}/out",
        mode="both",
        scales=[1.0],
        cam_scales=[1.0],
        precision="fp32",
        num_previews=2,
        metrics_port=port,
        host_workers=1,  # decoding and mask uploads in a worker process of the actor
    )
    job = run(cfg)
    # the first free port of the actors' range: port + 1 unless another process holds it
    assert port + 1 <= job["actors"][0]["metrics_port"] <= port + ACTOR_PORTS
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    run_label = f'run="{job["run"]}"'
    assert f"clustercam_label_queue_depth{{{run_label}}} 0.0" in scraped
    assert f"clustercam_label_input_images{{{run_label}}} 4.0" in scraped
    assert f"clustercam_label_done_images_total{{{run_label}}} 4.0" in scraped, "progress ends at 100%"
    assert job["counts"]["written"] == 3 and job["counts"]["failed"] == 1
    assert "cannot read image" in job["failures"][0]["reason"]
    direct = {"seg": ConfusionMatrix(K + 1), "cam": ConfusionMatrix(K + 1)}
    for row in rows[:3]:
        seg, cam = _read_mask(cfg, row["id"]), _read_mask(cfg, row["id"], "cam_masks")
        assert seg.shape == cam.shape == (64, 64)
        allowed = {0, *[NAMES.index(n) + 1 for n in row["labels"]]}
        assert set(np.unique(seg)) <= allowed and set(np.unique(cam)) <= allowed | {255}
        line = mask_codec("png").read_line(storage.get_bytes(storage.join(cfg.output, "masks", f"{row['id']}.png")))
        assert line["mode"] == "seg" and "fractions" in line["cam"]
        direct["seg"].add(gts[row["id"]], seg)
        direct["cam"].add(gts[row["id"]], cam)
    for mode in ("seg", "cam"):
        assert job["eval"][mode]["miou"] == pytest.approx(direct[mode].miou(), abs=1e-12)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _records(cfg) -> list[dict]:
    return [
        json.loads(storage.get_bytes(uri))
        for uri in storage.list_uris(storage.join(cfg.output, "units"))
        if uri.endswith(".json")
    ]


def _jsonl(output: str, record: dict) -> list[dict]:
    uri = storage.join(output, "units", f"{record['unit']}.{record['fingerprint']}.images.jsonl")
    return [json.loads(line) for line in storage.get_bytes(uri).decode().splitlines()]


def _masks_with_times(cfg) -> dict[str, tuple]:
    bucket, prefix = cfg.output[len("s3://") :].split("/", 1)
    client = storage._client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/masks/"):
        for obj in page.get("Contents", []):
            out[obj["Key"].rsplit("/", 1)[1][:-4]] = (obj["LastModified"], obj["ETag"])
    return out


def test_killed_job_rerun_writes_each_remaining_mask_once(s3_root, ray_cluster):
    n = 40
    samples = [synthetic_sample(i) for i in range(n)]
    write_dataset(f"{s3_root}/data", [s[:2] for s in samples], shard_size=20)
    model_uri = export_tiny(f"{s3_root}/model")
    args = [
        f"model={model_uri}",
        f"data={s3_root}/data",
        f"output={s3_root}/out",
        "mode=seg",
        "scales=[0.5,1.0,1.5]",
        "batch_size=1",
        "num_actors=1",
        "precision=fp32",
        "flush_every=1000",
        "threads_per_actor=1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"], "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.label", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cfg = LabelConfig(
        model=model_uri,
        data=f"{s3_root}/data",
        output=f"{s3_root}/out",
        scales=[0.5, 1.0, 1.5],
        batch_size=4,
        num_actors=2,
        precision="fp32",
    )
    try:
        deadline = time.monotonic() + 120
        while len(list_mask_keys(storage.join(cfg.output, "masks"))) < 8:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job wrote no masks in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = _masks_with_times(cfg)
    while True:  # Ray tears down the dead driver's actor asynchronously: wait until nothing is written
        time.sleep(1.5)
        now = _masks_with_times(cfg)
        if now == before:
            break
        before = now
    assert 8 <= len(before) < n, "kill the job half-way"
    assert not storage.exists(storage.join(cfg.output, "label_job.json"))
    time.sleep(1.1)  # LastModified has one-second resolution
    job = run(cfg)
    after = _masks_with_times(cfg)
    assert len(after) == n and job["complete"]
    assert job["counts"]["written"] == n - len(before) and job["counts"]["skipped_existing"] == len(before)
    assert all(after[k] == v for k, v in before.items()), "a mask of the killed run was written again"
    records = _records(cfg)
    keys = [key for r in records for key in r["written"] + r["skipped"]]
    assert sorted(keys) == sorted(after) and len(keys) == len(set(keys)), "every mask in exactly one unit record"
    assert {k for r in records if r["run"] == job["run"] for k in r["written"]} == set(after) - set(before)
    rows = [row["key"] for r in records for row in _jsonl(cfg.output, r)]
    assert sorted(rows) == sorted(after), "every mask has its quality row, once"
    # masks of the killed run in a unit it never finished get their lines back from their PNG
    finished_by_killed_run = sum(len(r["written"]) for r in records if r["run"] != job["run"])
    assert job["consistency"]["stats_recovered"] == len(before) - finished_by_killed_run
    direct = ConfusionMatrix(K + 1)  # the evaluation covers both runs' masks exactly
    for key, _, gt, _ in samples:
        direct.add(gt, _read_mask(cfg, key))
    assert job["eval"]["seg"]["miou"] == pytest.approx(direct.miou(), abs=1e-12) and job["eval"]["seg"]["images"] == n
    time.sleep(1.1)
    redo = run(dataclasses.replace(cfg, overwrite=True))
    assert redo["complete"] and redo["counts"]["written"] == n and redo["counts"]["skipped_existing"] == 0
    relabelled = _masks_with_times(cfg)
    assert all(relabelled[k][0] > after[k][0] for k in after), "overwrite=true writes every mask again"
    assert {r["run"] for r in _records(cfg)} == {redo["run"]}
    after = relabelled
    # a finished job's re-run reads no shard: with every shard unreadable it still completes, writing nothing
    for uri in storage.list_uris(f"{s3_root}/data"):
        if uri.endswith(".tar"):
            storage.put_bytes(uri, b"not a shard any more")
    again = run(cfg)
    assert again["complete"] and again["counts"]["written"] == 0 and again["counts"]["skipped_existing"] == n
    assert again["actors"] == [] and again["eval"]["seg"]["miou"] == job["eval"]["seg"]["miou"]
    assert _masks_with_times(cfg) == after
    summed = evaluate(EvaluateConfig(job=cfg.output))
    assert summed["from"] == "unit records" and summed["miou"] == pytest.approx(direct.miou(), abs=1e-12)
