"""End to end: `python -m pipelines.demo` at a tiny size, as `make demo` runs it on a fresh machine.

The demo starts its own S3 server and Ray head, ingests two synthetic splits, trains 2 DeepSpeed
workers for a few steps (into the segmentation phase), labels the held-out split, evaluates and
stops everything. Afterwards the test brings the S3 server back on the demo's data folder and checks
every artefact of the data contracts (README, "How it fits together"), then runs the demo again to
check that it reuses them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
from PIL import Image

from pipelines.stack import start_s3
from system import storage
from system.data.sources.synthetic import class_names, render
from system.masks import decode_mask
from tests.commands import REPO

pytestmark = pytest.mark.slow

CLASSES, SIZE, TRAIN, HELDOUT = 3, 48, 24, 6
ARGS = [
    f"num_classes={CLASSES}",
    f"image_size={SIZE}",
    f"train_images={TRAIN}",
    f"heldout_images={HELDOUT}",
    "shard_size=6",
    "ray_cpus=2",
    f"train=[model.num_classes={CLASSES},model.img_size={SIZE},stream.image_size={SIZE},stream.batch_size=3,"
    "stream.num_workers=0,schedule.steps_per_epoch=2,schedule.seg_start_epoch=1,max_steps=4]",
    'label=[num_previews=3,"scales=[1.0]","cam_scales=[1.0]"]',
]
HISTORY_KEYS = {"epoch", "step", "loss", "loss_cls", "loss_pat", "loss_seg", "lr", "samples_per_s", "data_wait_s"}


def _run_demo(workdir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.demo", f"dir={workdir}", *ARGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _alive_with(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or ())
        if marker in cmd:
            found.append(cmd[:200])
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    done = _run_demo(workdir)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((workdir / "outputs" / "summary.json").read_text())
    return workdir, done, summary


@pytest.fixture
def demo_s3(demo):
    """The demo's S3 server brought back on its data (and its credentials), for checking what it wrote;
    stopped after each test, since the demo itself starts one on the same folder."""
    workdir, _, _ = demo
    server = start_s3(workdir / "stack")
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in server.env().items():
                env.setenv(key, value)
            yield "s3://clustercam"
    finally:
        server.stop()


def test_demo_prints_the_summary_and_stops_what_it_started(demo):
    workdir, done, summary = demo
    assert "ClusterCAM demo summary" in done.stdout and "mIoU" in done.stdout
    started = summary["stopped_at_exit"]
    assert set(started) == {"s3", "ray"}
    assert (
        not psutil.pid_exists(started["s3"]["pid"])
        or psutil.Process(started["s3"]["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    assert _alive_with(started["ray"]["temp_dir"]) == []
    assert _alive_with(str(workdir)) == []
    for name in ("contact_sheet", "label_job", "eval", "model_json", "history", "summary"):
        assert os.path.getsize(summary["local_copies"][name]) > 0, name
    assert Image.open(summary["local_copies"]["contact_sheet"]).format == "PNG"


def test_no_ray_session_file_no_stored_object_and_no_output_holds_the_secret_key(demo):
    """Ingest, training and labelling ran through the local stack: the key reached every process through
    its node's environment only, so neither Ray's records (runtime envs, job infos, every log) nor the
    object store's files nor the printed output may contain it."""
    workdir, done, summary = demo
    creds = json.loads((workdir / "stack" / "s3-identities.json").read_text())["identities"][0]["credentials"][0]
    secret = creds["secretKey"].encode()
    ray_records = workdir / "stack" / "ray-logs"
    assert any(ray_records.glob("session_*/logs/runtime_env_agent.log")), "the Ray session's records were not kept"
    searched = [
        p
        for root in (ray_records, workdir / "stack" / "data", workdir / "outputs")
        for p in root.rglob("*")
        if p.is_file()
    ]
    assert len(searched) > 20
    assert [str(p) for p in searched if secret in p.read_bytes()] == []
    assert secret.decode() not in done.stdout + done.stderr


def test_summary_scores_match_an_independent_baseline_and_the_eval_file(demo, demo_s3):
    _, _, summary = demo
    # all-background baseline straight from the generator: IoU(bg) = GT bg pixels / valid pixels, 0 for
    # every class present in the GT, averaged over background + present classes
    bg = valid = 0
    present = set()
    for i in range(HELDOUT):
        _, mask, _ = render(i, CLASSES, SIZE, seed=1)
        bg += int((mask == 0).sum())
        valid += int((mask != 255).sum())
        present |= {int(v) for v in np.unique(mask) if v not in (0, 255)}
    assert summary["baseline_all_background_miou"] == pytest.approx(bg / valid / (1 + len(present)), abs=1e-9)
    evaluation = json.loads(storage.get_bytes(demo_s3 + "/labels/demo-heldout/eval.json"))
    assert summary["miou"] == pytest.approx(evaluation["miou"]) and evaluation["images"] == HELDOUT
    assert evaluation["missing_masks"] == 0
    assert 0 <= summary["miou"] <= 1 and summary["cam_miou"] is not None
    assert summary["training"]["steps"] == 4 and summary["training"]["zero_stage"] == 0
    assert summary["throughput"]["train_samples_per_s"] > 0 and summary["throughput"]["label_images_per_s"] > 0


def test_datasets_follow_the_shard_contract(demo_s3):
    for split, count in (("demo-train", TRAIN), ("demo-heldout", HELDOUT)):
        info = json.loads(storage.get_bytes(f"{demo_s3}/datasets/{split}/dataset.json"))
        assert info["classes"] == class_names(CLASSES)
        assert info["total_samples"] == count == sum(s["samples"] for s in info["shards"])
        for shard in info["shards"]:
            assert storage.exists(f"{demo_s3}/datasets/{split}/{shard['name']}")


def test_training_run_has_config_history_checkpoints_and_exported_model(demo_s3):
    run = demo_s3 + "/runs/demo"
    assert "num_workers: 2" in storage.get_bytes(run + "/config.yaml").decode()
    history = [json.loads(line) for line in storage.get_bytes(run + "/history.jsonl").decode().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(HISTORY_KEYS <= set(h) for h in history)
    assert history[0]["loss_seg"] is None and history[-1]["loss_seg"] is not None, "the run reaches the seg phase"
    meta = json.loads(storage.get_bytes(run + "/model/model.json"))
    assert meta["class_names"] == class_names(CLASSES) and meta["steps"] == 4
    assert meta["final_metrics"]["nodes"] == ["127.0.0.1", "127.0.0.1"]  # the stack's head (loopback-only Ray)
    assert storage.get_bytes(run + "/model/model.safetensors")[:8]
    assert any("checkpoint_" in key for key in storage.list_uris(run))


def test_labels_follow_the_mask_contract(demo_s3):
    out = demo_s3 + "/labels/demo-heldout"
    job = json.loads(storage.get_bytes(out + "/label_job.json"))
    assert job["complete"] and job["counts"]["masks"] == HELDOUT and job["counts"]["failed"] == 0
    stats = [
        json.loads(line)
        for key in storage.list_uris(out + "/stats")
        for line in storage.get_bytes(key).decode().splitlines()
    ]
    assert len({s["key"] for s in stats}) == HELDOUT
    for s in stats:
        png = Image.open(io.BytesIO(storage.get_bytes(f"{out}/masks/{s['key']}.png")))
        assert png.mode == "P" and png.size == (SIZE, SIZE)
        mask = decode_mask(storage.get_bytes(f"{out}/masks/{s['key']}.png"))
        assert set(np.unique(mask)) <= set(range(CLASSES + 1)) | {255}
    sheet = Image.open(io.BytesIO(storage.get_bytes(out + "/previews/contact_sheet.png")))
    assert sheet.width > SIZE and sheet.height > SIZE
    summary = json.loads(storage.get_bytes(demo_s3 + "/demo/summary.json"))
    assert summary["outputs"]["labels"] == out


def test_second_run_reuses_the_model_and_labels(demo):
    workdir, _, first = demo
    model_before = (workdir / "outputs" / "model.json").read_bytes()
    again = _run_demo(workdir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((workdir / "outputs" / "summary.json").read_text())
    assert summary["seconds"]["train"] == "reused" and summary["seconds"]["label"] == "reused"
    assert (workdir / "outputs" / "model.json").read_bytes() == model_before
    assert summary["miou"] == pytest.approx(first["miou"])
    assert _alive_with(summary["stopped_at_exit"]["ray"]["temp_dir"]) == []
