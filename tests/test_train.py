"""Ray Train + DeepSpeed training against the S3 fixture: ZeRO stages, parity with one process,
a killed worker, the exported model, and the checks that run before any worker starts."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import socket
import threading
import time

import psutil
import pytest
import ray.train
import torch

from pipelines.train import PreflightError, preflight, run
from system import storage
from system.config import load_config
from system.data.shards import read_dataset
from system.data.stream import train_loader
from system.hardware import CudaUnusable
from system.losses import Losses, StepLossMean, multilabel_loss
from system.model import ClusterCAM, load_clustercam
from system.optim import adamw, learning_rate, set_step_hyperparams
from system.training import TrainConfig, in_seg_phase, micro_batch_losses, stream_config
from tests.datasets import build_synthetic
from tests.golden import assert_rel
from tests.planted import planted_bytes
from workers.train import worker_device

NUM_CLASSES = 3
STEPS = 4  # two classification steps, then two segmentation-phase steps


@pytest.fixture(scope="module")
def dataset(s3_bucket):
    uri = f"s3://{s3_bucket}/train-data-{os.getpid()}"
    build_synthetic(uri, num_images=24, num_classes=NUM_CLASSES, image_size=64, shard_size=6)
    return uri


def tiny_config(data: str, output: str, **overrides) -> TrainConfig:
    """configs/tiny.yaml shrunk further; augmentation and drop path off and fp32 forced (``auto`` is bf16 on
    CPUs with AMX or AVX512-BF16), so runs are comparable with the fp32 single-process reference."""
    base = {
        "deepspeed.precision": "fp32",
        "model.num_classes": NUM_CLASSES,
        "model.decoder_channels": 32,
        "stream.batch_size": 2,
        "stream.augment": "none",
        "stream.num_workers": 0,
        "stream.shuffle_buffer": 8,
        "schedule.steps_per_epoch": 2,
        "schedule.seg_start_epoch": 1,
        "schedule.cam_scales": [1.0, 0.75],
        "max_steps": STEPS,
        "max_failures": 0,
        "metrics.log_every_steps": 1,
        "optim.warmup_epochs": 0,
        # the rate these parity bounds were derived at: Adam turns float32 noise in near-zero
        # gradients into steps of up to ~lr, so tiny.yaml's faster recipe would need looser ones
        "optim.lr_per_512": 0.03,
    }
    base.update(overrides)
    return load_config(
        TrainConfig,
        "configs/tiny.yaml",
        [f"data={data}", f"output={output}"]
        + [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()],
    )


def single_process_reference(cfg: TrainConfig) -> tuple[ClusterCAM, list[float]]:
    """The same schedule in one process on the global batch: both ranks' batches side by side."""
    info = read_dataset(cfg.data)
    steps = cfg.schedule.steps_per_epoch
    torch.manual_seed(cfg.seed)
    model = ClusterCAM(cfg.model).train()
    optimizer = adamw(model, cfg.optim, lr=0.0)
    for p in model.parameters():  # a ZeRO optimizer steps every parameter, a zero gradient where unused
        p.grad = torch.zeros_like(p)
    scfg = stream_config(cfg, steps)
    losses = []
    assert info.total_samples >= cfg.global_batch
    for step in range(cfg.max_steps):
        epoch = step // steps
        if step % steps == 0:
            loaders = [
                iter(train_loader(cfg.data, r, cfg.num_workers, scfg, epoch=epoch)) for r in range(cfg.num_workers)
            ]
        batches = [next(it) for it in loaders]
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        lr = learning_rate(cfg.optim, cfg.global_batch, cfg.schedule.epochs, steps, step)
        set_step_hyperparams(optimizer, lr, in_seg_phase(cfg.schedule, epoch))
        out = micro_batch_losses(model, model, images, labels, epoch, cfg.schedule)
        optimizer.zero_grad(set_to_none=False)
        out.total.backward()
        optimizer.step()
        losses.append(float(out.total.detach()))
    return model.eval(), losses


def initial_model(cfg: TrainConfig) -> ClusterCAM:
    torch.manual_seed(cfg.seed)
    return ClusterCAM(cfg.model).eval()


@torch.no_grad()
def dataset_loss(model: ClusterCAM, cfg: TrainConfig) -> float:
    """Classification loss of ``model`` over every training image (one fixed, deterministic pass)."""
    scfg = dataclasses.replace(cfg.stream, resampled=False, num_workers=0)
    total, n = 0.0, 0
    for images, labels, _ in train_loader(cfg.data, 0, 1, scfg):
        out = model(images, with_seg=False)
        total += float(multilabel_loss(out.cls_logits, labels) + multilabel_loss(out.pat_logits, labels)) * len(images)
        n += len(images)
    return total / n


def history(cfg: TrainConfig) -> list[dict]:
    lines = storage.get_bytes(cfg.run_uri() + "/history.jsonl").decode().splitlines()
    return [json.loads(line) for line in lines]


def test_a_step_reports_the_mean_of_its_micro_batch_losses():
    mean = StepLossMean(seg_weight=0.1)
    for cls, pat, seg in ((1.0, 2.0, 0.5), (3.0, 4.0, 1.5)):
        mean.add(Losses(torch.tensor(0.0), torch.tensor(cls), torch.tensor(pat), torch.tensor(seg)))
    assert mean.result() == pytest.approx(
        {"loss": 2.0 + 3.0 + 0.1 * 1.0, "loss_cls": 2.0, "loss_pat": 3.0, "loss_seg": 1.0}
    )


@pytest.fixture(scope="module")
def reference(dataset, s3_bucket):
    return single_process_reference(tiny_config(dataset, f"s3://{s3_bucket}/unused"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_single_process_and_loss_falls(ray_cluster, dataset, s3_root, reference, stage):
    validation = (
        {  # ZeRO-3 forwards are collective: validation must keep the ranks in step
            "validation.data": dataset,
            "validation.image_size": 64,
            "validation.batch_size": 4,
            "validation.max_batches": 1 + stage % 2,
            "validation.every_epochs": 1,
        }
        if stage == 3
        else {}
    )
    cfg = tiny_config(dataset, s3_root, zero_stage=stage, run_name=f"zero{stage}", **validation)
    result = run(cfg)
    assert result.error is None
    if validation:
        assert 0.0 <= result.metrics["val_seg_miou"] <= 1.0 and 0.0 <= result.metrics["val_cam_miou"] <= 1.0
    rows = history(cfg)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref_model, ref_losses = reference
    assert rows[0]["loss_seg"] is None and rows[-1]["loss_seg"] is not None  # both phases ran
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=1e-5)
    exported = load_clustercam(cfg.run_uri() + "/model")
    assert exported.cam_settings == {"layers": cfg.schedule.cam_layers, "p2p_refine": cfg.schedule.cam_p2p_refine}
    assert dataset_loss(exported, cfg) < dataset_loss(initial_model(cfg), cfg)
    ref_sd = ref_model.state_dict()
    for name, value in exported.state_dict().items():
        # Adam divides by the gradient's running RMS, so float32 noise in near-zero gradients moves
        # a parameter by up to ~lr * 1e-3: absolute 1e-5 is the meaningful bound here
        torch.testing.assert_close(value, ref_sd[name], rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        for a, b in zip(exported(x), ref_model(x)):
            assert_rel(a, b, tol=1e-4)
    assert exported.class_names == read_dataset(dataset).classes
    assert len(set(rows[-1]["nodes"] if "nodes" in rows[-1] else result.metrics["nodes"])) == 1


def _kill_one_worker_after_first_checkpoint(cfg: TrainConfig, killed: list) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        if any("/checkpoint_" in u for u in storage.list_uris(cfg.run_uri())):
            for proc in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def test_killed_worker_resumes_from_checkpoint_and_ends_at_the_same_loss(ray_cluster, dataset, s3_root, reference):
    """The uninterrupted run is the single-process reference, which every ZeRO stage matches."""
    cfg = tiny_config(dataset, s3_root, run_name="killed", max_failures=1, **{"checkpoint.every_steps": 1})
    killed: list = []
    killer = threading.Thread(target=_kill_one_worker_after_first_checkpoint, args=(cfg, killed), daemon=True)
    killer.start()
    result = run(cfg)
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.error is None
    rows = history(cfg)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # resumed, not restarted: each step once
    ref_model, ref_losses = reference
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=1e-5)
    exported = load_clustercam(cfg.run_uri() + "/model").state_dict()
    for name, value in ref_model.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=1e-5, atol=1e-5)


def test_a_planted_pickle_in_the_checkpoint_fails_the_resumed_run_without_running_or_starting_over(
    ray_cluster, dataset, s3_root, tmp_path
):
    first = tiny_config(dataset, s3_root, run_name="planted", max_steps=1)
    assert run(first).error is None
    marker = tmp_path / "payload-ran"
    model_states = [
        u
        for u in storage.list_uris(first.run_uri())
        if "/checkpoint_" in u and u.endswith("/mp_rank_00_model_states.pt")
    ]
    assert model_states, "the first run saved no checkpoint"
    for uri in model_states:
        genuine = tmp_path / "genuine.pt"
        genuine.write_bytes(storage.get_bytes(uri))
        storage.put_bytes(uri, planted_bytes(genuine, marker))
    stored = re.escape(first.run_uri().removeprefix("s3://")) + "/checkpoint_[^:]+"
    local_file = r"/checkpoint/mp_rank_00_model_states\.pt"
    with pytest.raises(ray.train.TrainingFailedError, match=f"{stored}: .*{local_file}: refused"):
        run(tiny_config(dataset, s3_root, run_name="planted", max_steps=STEPS))
    assert not marker.exists()
    assert [r["step"] for r in history(first)] == [1]  # a fresh start would have rewritten steps 1..STEPS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without usable CUDA")
def test_use_gpu_without_usable_cuda_stops_the_worker_naming_the_node_and_the_cause():
    cfg = tiny_config("s3://b/d", "s3://b/o", use_gpu=True)
    with pytest.raises(CudaUnusable) as refused:
        worker_device(cfg, 0)
    message = str(refused.value)
    assert message.startswith(
        f"training (use_gpu=true) asked for a GPU, but CUDA is not usable on {socket.gethostname()}: "
    )
    assert "NVIDIA driver" in message and f"built for CUDA {torch.version.cuda}" in message


def test_preflight_names_what_is_wrong(dataset, s3_root, s3_bucket, tmp_path):
    with pytest.raises(PreflightError, match="data: .*no dataset.json"):
        preflight(tiny_config(s3_root + "/nothing-here", s3_root))
    with pytest.raises(PreflightError, match=f"has {NUM_CLASSES} classes but model.num_classes is 5"):
        preflight(tiny_config(dataset, s3_root, **{"model.num_classes": 5}))
    with pytest.raises(PreflightError, match="output: .*no-such-bucket"):
        preflight(tiny_config(dataset, "s3://no-such-bucket-xyz/root"))
    corrupt = tmp_path / "corrupt.pth"
    buf = io.BytesIO()
    torch.save({"model": {"cls_token": torch.zeros(1, 3, 48)}}, buf)
    corrupt.write_bytes(buf.getvalue()[:200])
    with pytest.raises(PreflightError, match="weights: .*corrupt.pth"):
        preflight(tiny_config(dataset, s3_root, weights=str(corrupt)))
    assert preflight(tiny_config(dataset, s3_root)).total_samples == 24
