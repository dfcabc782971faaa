"""The per-worker training loop: one DeepSpeed engine per Ray Train worker.

Reads top to bottom: set up the rank, build the model and the engine, restore the latest checkpoint
if Ray hands one over, then the schedule (docs/method.md §b.3-b.9) epoch by epoch with checkpoints, validation
and telemetry, and finally the export of the consolidated weights. ``TrainStep`` is one optimizer step;
when to checkpoint and when to validate are the policies of ``Checkpointer`` (workers/checkpointer.py)
and ``Validator`` (workers/validator.py), each owning its config section.

What makes a resumed run the run it replaces: the learning rate is a function of the optimizer step,
drop path is seeded per micro-step, and the data stream is a function of (seed, epoch, rank, batch);
so restoring model, optimizer, epoch and step restores everything, and a restarted run ends at the
same loss as one that never stopped.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import deepspeed
import deepspeed.ops
import ray.train
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from system.config import from_dict
from system.data.shards import read_dataset
from system.data.stream import train_loader
from system.hardware import Resolved, require_cuda, resolve_precision
from system.losses import Ranks, StepLossMean
from system.model import (
    ClusterCAM,
    build_model,
    export_model,
    init_from_deit,
    loss_metric_term,
    read_state_dict,
    recognise,
)
from system.model.spec import get_spec
from system.optim import adamw, learning_rate, set_step_hyperparams
from system.telemetry import Progress, setup_logging, start_metrics_server, train_metrics
from system.training import (
    MetricsConfig,
    TrainConfig,
    cam_settings,
    in_seg_phase,
    micro_batch_losses,
    step_seed,
    steps_per_epoch,
    stream_config,
)
from workers.checkpointer import Checkpointer, Position
from workers.validator import Validator

log = logging.getLogger("clustercam.train")


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
    """A checkpoint of a known model kind loads strictly; anything else is taken for ImageNet DeiT and
    mapped (docs/method.md §b.2)."""
    sd = read_state_dict(uri)
    if recognise(sd, uri) is not None:
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


def record_step(
    metrics,
    tag: tuple[str, str],
    row: dict,
    step_time: float,
    wait: float,
    samples: int,
    device,
    terms: tuple[str, ...],
) -> None:
    """``tag``: the (run, rank) labels; ``terms``: the row's loss columns, as the model's spec names them."""
    metrics.samples.labels(*tag).inc(samples)
    metrics.steps.labels(*tag).inc()
    metrics.step_seconds.labels(*tag).observe(step_time)
    metrics.data_wait_seconds.labels(*tag).observe(wait)
    metrics.samples_per_second.labels(*tag).set(samples / step_time)
    metrics.learning_rate.labels(*tag).set(row["lr"])
    for term in terms:
        if row[term] is not None:
            metrics.loss.labels(*tag, loss_metric_term(term)).set(row[term])
    metrics.memory_bytes.labels(*tag).set(peak_memory_bytes(device))


def worker_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.use_gpu:
        require_cuda("training (use_gpu=true)")
        return torch.device("cuda", local_rank)
    # the worker owns cpus_per_worker cores; torch would otherwise follow OMP_NUM_THREADS from Ray
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    return torch.device("cpu")


def start_distributed(device: torch.device, world: int) -> list[str]:
    """DeepSpeed's process group over the Ray workers; returns every rank's node address."""
    # only DeepSpeed's inference uses this op, and its JIT build takes over a minute on CPU
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.util.get_node_ip_address())
    return nodes


def build_engine(cfg: TrainConfig, precision: Resolved):
    """The model (seeded; initial weights unless a checkpoint will be restored) in a DeepSpeed engine."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.weights and ray.train.get_checkpoint() is None:
        initial_weights(model, cfg.weights)
    optimizer = adamw(model, cfg.optim, lr=cfg.optim.warmup_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, precision))
    if cfg.zero_stage == 3:
        # the CAM reads the head's weight outside the head's own forward
        deepspeed.zero.register_external_parameter(engine.module, engine.module.head.weight)
    return engine, optimizer


@dataclass
class StepStats:
    losses: dict  # the step's mean losses over micro-batches and ranks (``StepLossMean.result``)
    lr: float
    step_time: float
    wait: float  # of ``step_time``, seconds spent waiting for batches
    samples: int  # images this rank trained on


class TrainStep:
    """One optimizer step: ``grad_accum`` micro-batches (forward, backward, DeepSpeed's step each)."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine,
        optimizer,
        steps: int,
        rank: int,
        ranks: Ranks,
        device: torch.device,
        dtype: torch.dtype,
        partial_labels: bool = False,
    ):
        self.cfg, self.engine, self.optimizer, self.steps = cfg, engine, optimizer, steps
        self.rank, self.ranks, self.device, self.dtype = rank, ranks, device, dtype
        self.partial_labels = partial_labels  # the dataset leaves some classes unknown: pass the known masks on

    def __call__(self, batches, position: Position) -> StepStats:
        cfg, engine, accum = self.cfg, self.engine, self.cfg.schedule.grad_accum
        lr = learning_rate(cfg.optim, cfg.global_batch, cfg.schedule.epochs, self.steps, position.global_step)
        set_step_hyperparams(self.optimizer, lr, in_seg_phase(cfg.schedule, position.epoch))
        t_step = time.perf_counter()
        wait = 0.0
        step_losses = StepLossMean(cfg.schedule.seg_loss_weight, self.ranks)
        for micro in range(accum):
            t_data = time.perf_counter()
            images, labels, known = next(batches)
            wait += time.perf_counter() - t_data
            torch.manual_seed(step_seed(cfg.seed, self.rank, position.global_step * accum + micro))
            images, labels = images.to(self.device, self.dtype), labels.to(self.device)
            known = known.to(self.device) if self.partial_labels else None
            losses = micro_batch_losses(
                engine, engine.module, images, labels, position.epoch, cfg.schedule, self.ranks, known
            )
            engine.backward(losses.total)
            engine.step()
            step_losses.add(losses)
        step_time = time.perf_counter() - t_step
        return StepStats(step_losses.result(), lr, step_time, wait, cfg.stream.batch_size * accum)


class StepTelemetry:
    """Every step's Prometheus metrics and progress, and rank 0's log line every ``log_every_steps``.

    The endpoint is on ``port + local rank``: a pod (a node) declares one port per GPU it has, and
    that covers every rank it can run, however many nodes the job spans."""

    def __init__(
        self,
        cfg: MetricsConfig,
        run: str,
        rank: int,
        local_rank: int,
        total_steps: int,
        start_step: int,
        device: torch.device,
        terms: tuple[str, ...],
    ):
        self.cfg, self.rank, self.tag, self.device, self.terms = cfg, rank, (run, str(rank)), device, terms
        self.metrics = train_metrics()
        if cfg.port:
            start_metrics_server(cfg.port + local_rank, cfg.addr)
        self.progress = Progress(total_steps, "train steps", log=lambda _: None, start=start_step)

    def epoch(self, epoch: int) -> None:
        self.metrics.epoch.labels(*self.tag).set(epoch)

    def step(self, row: dict, stats: StepStats) -> None:
        record_step(self.metrics, self.tag, row, stats.step_time, stats.wait, stats.samples, self.device, self.terms)
        self.progress.update(1)
        if self.rank == 0 and row["step"] % self.cfg.log_every_steps == 0:
            log.info(
                "%s | loss %.4f cls %.4f pat %.4f seg %s lr %.3g",
                self.progress.line(),
                row["loss"],
                row["loss_cls"],
                row["loss_pat"],
                row["loss_seg"],
                row["lr"],
            )


def export_weights(engine, cfg: TrainConfig, class_names: list[str], position: Position, row: dict, rank: int) -> None:
    """The consolidated fp32 weights to ``<run>/model`` (gathered on every rank, written by rank 0)."""
    weights = full_state_dict(engine)
    if rank == 0:
        export_model(
            engine.module,
            cfg.run_uri() + "/model",
            class_names=class_names,
            run_id=cfg.run_name,
            extra={
                "dataset": cfg.data,
                "steps": position.global_step,
                "final_metrics": row,
                "cam": cam_settings(cfg.schedule),
            },
            state_dict=weights,
        )
    if dist.is_initialized():
        dist.barrier()


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(TrainConfig, config)
    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(cfg, ctx.get_local_rank())
    precision = resolve_precision(cfg.deepspeed.precision, device)
    nodes = start_distributed(device, world)

    info = read_dataset(cfg.data)
    class_names = list(info.classes)
    steps = steps_per_epoch(cfg, info.total_samples)
    total_steps = cfg.schedule.epochs * steps
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    engine, optimizer = build_engine(cfg, precision)
    checkpointer = Checkpointer(cfg.checkpoint, engine, cfg.run_uri(), rank)
    position = checkpointer.restore().normalized(steps)
    validator = Validator(cfg.validation, cfg.schedule, len(class_names), device, precision.dtype, rank, world)
    train_step = TrainStep(
        cfg, engine, optimizer, steps, rank, Ranks.of_process_group(), device, precision.dtype, info.partial_labels
    )
    telemetry = StepTelemetry(
        cfg.metrics,
        cfg.run_name,
        rank,
        ctx.get_local_rank(),
        total_steps,
        position.global_step,
        device,
        get_spec(cfg.model.head).loss_terms,
    )
    if rank == 0:
        log.info(
            "%d workers on nodes %s, %s, ZeRO %d, %d steps/epoch, %d steps",
            world,
            nodes,
            precision,
            cfg.zero_stage,
            steps,
            total_steps,
        )

    scfg = stream_config(cfg, steps)
    row: dict = {}
    engine.train()
    while position.global_step < total_steps:
        batches = iter(
            train_loader(
                cfg.data,
                rank,
                world,
                scfg,
                epoch=position.epoch,
                skip_batches=position.step_in_epoch * cfg.schedule.grad_accum,
                device=device,
            )
        )
        telemetry.epoch(position.epoch)
        while position.step_in_epoch < steps and position.global_step < total_steps:
            stats = train_step(batches, position)
            position = position.advanced()
            row = {
                "epoch": position.epoch,
                "step": position.global_step,
                **stats.losses,
                "lr": stats.lr,
                "samples_per_s": stats.samples * world / stats.step_time,
                "data_wait_s": stats.wait,
                "nodes": nodes,
            }
            telemetry.step(row, stats)
            checkpointer.record(row)
            epoch_end, finished = position.step_in_epoch == steps, position.global_step >= total_steps
            if validator.due(position.epoch, epoch_end, finished):
                row.update(validator.run(engine))
            checkpointer.maybe_save(position, epoch_end, finished, row)
        position = position.normalized(steps)
    export_weights(engine, cfg, class_names, position, row, rank)
