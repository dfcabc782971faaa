"""The per-worker training loop: one DeepSpeed engine per Ray Train worker.

Reads top to bottom: set up the rank, build the model and the engine, restore the latest checkpoint
if Ray hands one over, then the schedule (docs/method.md §b.3-b.9) epoch by epoch with checkpoints, validation
and telemetry, and finally the export of the consolidated weights.

What makes a resumed run the run it replaces: the learning rate is a function of the optimizer step,
drop path is seeded per micro-step, and the data stream is a function of (seed, epoch, rank, batch);
so restoring model, optimizer, epoch and step restores everything, and a restarted run ends at the
same loss as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import deepspeed.ops
import ray.train
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from system import storage
from system.cam import predict_probs
from system.config import from_dict
from system.data.shards import read_dataset
from system.data.stream import eval_loader, train_loader
from system.hardware import Resolved, resolve_precision
from system.losses import Ranks, StepLossMean
from system.metrics import ConfusionMatrix
from system.model import ClusterCAM, export_model, init_from_deit, read_state_dict
from system.optim import adamw, learning_rate, set_step_hyperparams
from system.telemetry import Progress, start_metrics_server, train_metrics
from system.training import (
    TrainConfig,
    cam_labels,
    in_seg_phase,
    micro_batch_losses,
    step_seed,
    stream_config,
    steps_per_epoch,
)
from workers.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("clustercam.train")
CHECKPOINT_TAG = "checkpoint"
STATE_FILE = "train_state.json"


@dataclass
class Position:
    """Where the run stands: the data position and the optimizer step."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0

    def normalized(self, steps_per_epoch: int) -> "Position":
        """A finished epoch is the start of the next one."""
        if self.step_in_epoch >= steps_per_epoch:
            return Position(self.epoch + 1, 0, self.global_step)
        return self


def deepspeed_config(cfg: TrainConfig, precision: Resolved) -> dict:
    ds = cfg.deepspeed
    zero: dict = {"stage": cfg.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.stream.batch_size,
        "gradient_accumulation_steps": cfg.schedule.grad_accum,
        "train_batch_size": cfg.global_batch,
        # DeepSpeed silently clips at 1.0 unless told; the authors do not clip
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision.name == "bf16"},
        "fp16": {"enabled": precision.name == "fp16"},
        # our torch AdamW, not FusedAdam / DeepSpeedCPUAdam and their JIT builds
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config.update(ds.extra)
    return config


def initial_weights(model: ClusterCAM, uri: str) -> None:
    """An ImageNet DeiT checkpoint is mapped (docs/method.md §b.2); a ClusterCAM checkpoint loads strictly."""
    sd = read_state_dict(uri)
    if any(".st_attn." in k for k in sd):
        model.load_state_dict(sd, strict=True)
    else:
        init_from_deit(model, sd)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 weights with the authors' names, whole on every rank, from any ZeRO stage (collective)."""
    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (param if full is None else full).detach().float().cpu().clone()
    return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def validate(engine, cfg: TrainConfig, num_classes: int, device: torch.device, dtype: torch.dtype) -> dict:
    """mIoU of the segmentation head and of CAM + PAR labels (``cam_labels``), merged over all workers.

    Ranks may hold different numbers of validation batches; a rank that has run out keeps making
    dummy forwards until every rank is done, because ZeRO-3 forwards are collective.
    """
    val = cfg.validation
    ctx = ray.train.get_context()
    model = engine.module
    was_training = model.training
    model.eval()
    seg_cm, cam_cm = ConfusionMatrix(num_classes + 1), ConfusionMatrix(num_classes + 1)
    batches = iter(eval_loader(val.data, val.batch_size, val.image_size, ctx.get_world_rank(), ctx.get_world_size()))
    done = 0
    while True:
        batch = None if val.max_batches and done >= val.max_batches else next(batches, None)
        if not _any_rank(batch is not None):
            break
        if batch is None:
            dummy = torch.zeros(1, 3, val.image_size, val.image_size, device=device, dtype=dtype)
            predict_probs(model, dummy, val.scales)
            cam_labels(model, dummy, torch.ones(1, num_classes, device=device), cfg.schedule)
            continue
        images = batch["images"].to(device, dtype)
        labels = batch["labels"].to(device)
        pred = predict_probs(model, images, val.scales).argmax(dim=1)
        seg_cm.add(batch["masks"], pred)
        cam_cm.add(batch["masks"], cam_labels(model, images, labels, cfg.schedule))
        done += 1
    model.train(was_training)
    states = torch.stack([seg_cm.state(), cam_cm.state()])
    if dist.is_initialized():
        dist.all_reduce(states)
    seg_cm, cam_cm = ConfusionMatrix.from_state(states[0]), ConfusionMatrix.from_state(states[1])
    return {"val_seg_miou": seg_cm.miou(), "val_cam_miou": cam_cm.miou()}


def save_checkpoint(engine, position: Position, metrics: dict, rank: int, async_upload: bool) -> None:
    """Every rank writes its own ZeRO shard and reports it; Ray merges them into one checkpoint.

    With ``async_upload`` Ray uploads the directory in the background (and deletes it after), so a
    large checkpoint on its way to object storage does not stall the next steps.
    """
    directory = tempfile.mkdtemp(prefix="clustercam-ckpt-")
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"position": position.__dict__})
    if rank == 0:
        Path(directory, STATE_FILE).write_text(json.dumps({**position.__dict__, **metrics}, indent=1))
    mode = ray.train.CheckpointUploadMode.ASYNC if async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


def restore_checkpoint(engine) -> Position:
    """The position of Ray's latest checkpoint, its model and optimizer states loaded as data.

    A file that is not plain data (``CheckpointError``) fails the run: starting over from
    step 0 would hide the tampering and discard the run's progress.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    with checkpoint.as_directory() as directory:
        try:
            client_state = load_checkpoint(engine, directory, CHECKPOINT_TAG)
        except CheckpointError as err:  # ``directory`` is a local copy: name the stored checkpoint too
            raise CheckpointError(f"checkpoint {checkpoint.path}: {err}") from err
    position = Position(**client_state["position"])
    log.info("resumed from %s at epoch %d, step %d", checkpoint.path, position.epoch, position.global_step)
    return position


class History:
    """Rank 0's per-step metrics, kept in ``<run>/history.jsonl`` and cut back to the restored step
    on resume, so the file always tells the story of the run that produced the final model."""

    def __init__(self, run_uri: str, upto_step: int):
        self.uri = run_uri + "/history.jsonl"
        self.rows: list[dict] = []
        if upto_step and storage.exists(self.uri):
            lines = storage.get_bytes(self.uri).decode().splitlines()
            self.rows = [row for row in map(json.loads, lines) if row["step"] <= upto_step]

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def save(self) -> None:
        storage.put_bytes(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows).encode())


def record_step(metrics, tag: str, row: dict, step_time: float, wait: float, samples: int, device) -> None:
    metrics.samples.labels(tag).inc(samples)
    metrics.steps.labels(tag).inc()
    metrics.step_seconds.labels(tag).observe(step_time)
    metrics.data_wait_seconds.labels(tag).observe(wait)
    metrics.samples_per_second.labels(tag).set(samples / step_time)
    metrics.learning_rate.labels(tag).set(row["lr"])
    for term in ("loss", "loss_cls", "loss_pat", "loss_seg"):
        if row[term] is not None:
            metrics.loss.labels(tag, term.removeprefix("loss_") if term != "loss" else "total").set(row[term])
    metrics.memory_bytes.labels(tag).set(peak_memory_bytes(device))


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(TrainConfig, config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_cuda = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if use_cuda else torch.device("cpu")
    if not use_cuda:
        # the worker owns cpus_per_worker cores; torch would otherwise follow OMP_NUM_THREADS from Ray
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    precision = resolve_precision(cfg.deepspeed.precision, device)
    dtype = precision.dtype

    # only DeepSpeed's inference uses this op, and its JIT build takes over a minute on CPU
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.util.get_node_ip_address())
    ranks = Ranks.of_process_group()

    info = read_dataset(cfg.data)
    class_names = list(info["classes"])
    steps = steps_per_epoch(cfg, info["total_samples"])
    total_steps = cfg.schedule.epochs * steps
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)
    model = ClusterCAM(cfg.model)
    if cfg.weights and ray.train.get_checkpoint() is None:
        initial_weights(model, cfg.weights)
    optimizer = adamw(model, cfg.optim, lr=cfg.optim.warmup_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, precision))
    if cfg.zero_stage == 3:
        # the CAM reads the head's weight outside the head's own forward
        deepspeed.zero.register_external_parameter(engine.module, engine.module.head.weight)
    position = restore_checkpoint(engine).normalized(steps)
    history = History(cfg.run_uri(), position.global_step) if rank == 0 else None
    if rank == 0:
        log.info("%d workers on nodes %s, %s, ZeRO %d, %d steps/epoch, %d steps", world, nodes, precision,
                 cfg.zero_stage, steps, total_steps)

    metrics = train_metrics()
    tag = str(rank)
    if cfg.metrics.port:
        start_metrics_server(cfg.metrics.port + rank, cfg.metrics.addr)
    progress = Progress(total_steps, "train steps", log=lambda _: None, start=position.global_step)
    scfg = stream_config(cfg, steps)
    accum = cfg.schedule.grad_accum
    row: dict = {}
    engine.train()
    while position.global_step < total_steps:
        epoch = position.epoch
        batches = iter(train_loader(cfg.data, rank, world, scfg, epoch=epoch, skip_batches=position.step_in_epoch * accum,
                                    device=device))
        metrics.epoch.labels(tag).set(epoch)
        while position.step_in_epoch < steps and position.global_step < total_steps:
            lr = learning_rate(cfg.optim, cfg.global_batch, cfg.schedule.epochs, steps, position.global_step)
            set_step_hyperparams(optimizer, lr, in_seg_phase(cfg.schedule, epoch))
            t_step = time.perf_counter()
            wait = 0.0
            step_losses = StepLossMean(cfg.schedule.seg_loss_weight, ranks)
            for micro in range(accum):
                t_data = time.perf_counter()
                images, labels = next(batches)
                wait += time.perf_counter() - t_data
                torch.manual_seed(step_seed(cfg.seed, rank, position.global_step * accum + micro))
                losses = micro_batch_losses(
                    engine, engine.module, images.to(device, dtype), labels.to(device), epoch, cfg.schedule, ranks
                )
                engine.backward(losses.total)
                engine.step()
                step_losses.add(losses)
            step_time = time.perf_counter() - t_step
            position = Position(epoch, position.step_in_epoch + 1, position.global_step + 1)
            samples = cfg.stream.batch_size * accum
            row = {
                "epoch": epoch,
                "step": position.global_step,
                **step_losses.result(),
                "lr": lr,
                "samples_per_s": samples * world / step_time,
                "data_wait_s": wait,
                "nodes": nodes,
            }
            record_step(metrics, tag, row, step_time, wait, samples, device)
            progress.update(1)
            if rank == 0:
                history.add({k: v for k, v in row.items() if k != "nodes"})
                if position.global_step % cfg.metrics.log_every_steps == 0:
                    log.info("%s | loss %.4f cls %.4f pat %.4f seg %s lr %.3g", progress.line(), row["loss"],
                             row["loss_cls"], row["loss_pat"], row["loss_seg"], lr)
            epoch_end = position.step_in_epoch == steps
            finished = position.global_step >= total_steps
            if cfg.validation.data and (finished or (epoch_end and (epoch + 1) % cfg.validation.every_epochs == 0)):
                row.update(validate(engine, cfg, len(class_names), device, dtype))
                engine.train()
            every = cfg.checkpoint.every_steps
            if epoch_end or finished or (every and position.global_step % every == 0):
                if rank == 0:
                    history.save()
                save_checkpoint(engine, position, row, rank, cfg.checkpoint.async_upload)
        position = position.normalized(steps)

    weights = full_state_dict(engine)
    if rank == 0:
        export_model(
            engine.module,
            cfg.run_uri() + "/model",
            class_names=class_names,
            run_id=cfg.run_name,
            extra={"dataset": cfg.data, "steps": position.global_step, "final_metrics": row,
                   "cam": {"layers": cfg.schedule.cam_layers, "p2p_refine": cfg.schedule.cam_p2p_refine}},
            state_dict=weights,
        )
    if dist.is_initialized():
        dist.barrier()
