"""The single-stage ClusterCAM training recipe, independent of Ray and DeepSpeed.

``TrainConfig`` is the whole run config (what ``python -m pipelines.train`` parses); ``micro_batch_losses``
is one micro-batch of docs/method.md §b.3: classification phase, or - from ``seg_start_epoch`` - multi-scale
CAMs -> PAR pseudo labels -> segmentation loss, scored by the one objective in ``system.losses``. The
distributed worker (workers/train.py) and a plain single-process loop (tests, benchmarks) both call
it, which is what makes them comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Literal

import torch

from system.cam import CAM_LAYERS, CAM_P2P_REFINE, multi_scale_cam
from system.config import option
from system.data.shards import read_dataset
from system.data.stream import StreamConfig, train_loader
from system.hardware import Precision
from system.losses import ONE_PROCESS, SEG_LOSS_WEIGHT, Losses, Ranks, clustercam_loss
from system.model import ClusterCAM, ClusterCAMConfig, build_model
from system.optim import OptimConfig, adamw, learning_rate, set_step_hyperparams
from system.refine import cam_to_label, denormalize, pseudo_labels, refine_with_background


@dataclasses.dataclass
class ScheduleConfig:
    epochs: int = option(80, "training epochs (VOC 80, COCO 60)")
    seg_start_epoch: int = option(50, "first epoch of the segmentation phase (CAM -> pseudo labels -> seg loss)")
    steps_per_epoch: int = option(
        0, "optimizer steps per epoch; 0 = dataset samples // global batch (the authors' drop_last epoch)"
    )
    grad_accum: int = option(1, "micro-batches per optimizer step on each worker")
    cam_scales: tuple[float, ...] = option((1.0, 0.75, 1.25), "scales of the training-time multi-scale CAM")
    cam_train_mode: bool = option(
        True, "make training CAMs with drop path active, as the authors do (docs/method.md §e.9)"
    )
    cam_layers: int = option(
        CAM_LAYERS, "last blocks whose class-to-patch attention gates the CAM (docs/method.md §a.7 n_layers)"
    )
    cam_p2p_refine: bool = option(
        CAM_P2P_REFINE,
        "spread CAMs along every block's patch-to-patch attention (docs/method.md §a.7); off for a model trained "
        "from scratch, whose diffuse attention smears the CAM over the whole image",
    )
    bg_threshold: float = option(0.4, "background threshold of the pseudo labels (VOC 0.40, COCO 0.43)")
    ignore_delta: float = option(0.1, "half-width of the ignored band around bg_threshold")
    seg_loss_weight: float = option(SEG_LOSS_WEIGHT, "weight of the segmentation loss")
    unknown_labels: Literal["ignore", "negative"] = option(
        "ignore",
        "partial labels (a sample's known classes, e.g. OpenImages'): ignore = an unknown class adds nothing to the "
        "classification losses and its CAM regions are not background; negative = count it as absent (the plain "
        "multi-label loss); datasets with complete labels train the same either way",
    )


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = option(
        500, "save a checkpoint every N optimizer steps (and at every epoch end); 0 = epoch ends only"
    )
    keep: int = option(2, "checkpoints kept by Ray (oldest deleted first)")
    async_upload: bool = option(True, "upload checkpoints in the background instead of stalling the step")


@dataclasses.dataclass
class ValidationConfig:
    data: str | None = option(None, "dataset URI with GT masks for mIoU; null = no validation")
    every_epochs: int = option(5, "validate every N epochs (and after the last)")
    image_size: int = option(448, "validation images are resized to this square size")
    batch_size: int = option(4, "validation images per batch per worker")
    scales: tuple[float, ...] = option((1.0,), "test-time scales of the segmentation head during validation")
    max_batches: int = option(0, "stop each worker after N batches; 0 = the whole dataset")


@dataclasses.dataclass
class DeepSpeedConfig:
    precision: Precision = option(
        "auto",
        "auto = bf16 on GPUs and bf16-native CPUs, fp32 elsewhere; bf16 is DeepSpeed's (the forward in bf16 weights, "
        "fp32 master weights in the optimizer), not autocast; fp16 (GPU) uses loss scaling",
    )
    offload_optimizer: bool = option(False, "ZeRO-Offload: optimizer states and step on the CPU (zero_stage 1-3)")
    offload_params: bool = option(False, "ZeRO-3 parameter offload to the CPU (zero_stage 3)")
    extra: dict = option(factory=dict, doc="raw DeepSpeed config keys merged last (expert use)")


@dataclasses.dataclass
class MetricsConfig:
    port: int = option(0, "Prometheus port of local rank 0 (local rank r serves port + r); 0 = no HTTP endpoint")
    addr: str = option("127.0.0.1", "address the metrics endpoint binds to")
    log_every_steps: int = option(20, "log a progress line (rate, ETA, losses) every N optimizer steps")


@dataclasses.dataclass
class TrainConfig:
    """Train ClusterCAM on a WebDataset dataset with Ray Train + DeepSpeed."""

    data: str = option(None, "dataset URI (the directory holding dataset.json) - required")
    output: str = option(None, "storage root URI; the run goes to <output>/runs/<run_name> - required")
    run_name: str = option("clustercam", "run name; re-submitting the same name resumes its latest checkpoint")
    num_workers: int = option(1, "Ray Train workers (one DeepSpeed rank each)")
    use_gpu: bool = option(False, "one GPU per worker")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", "Ray placement of the workers (SPREAD = one per node where possible)"
    )
    zero_stage: int = option(
        0,
        "DeepSpeed ZeRO stage 0-3. 0 = data parallel, the fastest while model + optimizer state fit (DeiT-S: "
        "350 MB); 1/2/3 also partition optimizer state / gradients / weights across workers, for backbones whose "
        "state does not fit, at the cost of per-tensor bucket copies each step",
    )
    max_steps: int = option(0, "stop after N optimizer steps (still checkpoint and export); 0 = run the schedule")
    max_failures: int = option(3, "worker-group restarts Ray Train allows before the run fails")
    seed: int = option(
        0, "seed of the run: model init, drop path and data order (added to stream.seed, so seeds give different runs)"
    )
    weights: str | None = option(
        None,
        "initial weights: an ImageNet DeiT/ViT checkpoint (docs/method.md §b.2) or a ClusterCAM checkpoint; "
        "null = random",
    )
    model: ClusterCAMConfig = option(factory=ClusterCAMConfig, doc="network shape")
    stream: StreamConfig = option(
        factory=StreamConfig, doc="data stream; stream.batch_size is the micro-batch per worker"
    )
    schedule: ScheduleConfig = option(factory=ScheduleConfig, doc="epochs and the segmentation phase")
    optim: OptimConfig = option(factory=OptimConfig, doc="AdamW and learning rate")
    deepspeed: DeepSpeedConfig = option(factory=DeepSpeedConfig, doc="DeepSpeed engine")
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig, doc="checkpointing")
    validation: ValidationConfig = option(factory=ValidationConfig, doc="validation")
    metrics: MetricsConfig = option(factory=MetricsConfig, doc="telemetry")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data (the dataset URI) is required")
        if not self.output:
            raise ValueError("output (the storage root URI) is required")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        # DeepSpeed would only refuse these inside the workers, after the cluster has started them
        if self.deepspeed.offload_optimizer and self.zero_stage < 1:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3 (the default is 0)")
        if self.deepspeed.offload_params and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params needs zero_stage 3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.schedule.seg_start_epoch < 0 or self.schedule.epochs < 1:
            raise ValueError("schedule.epochs must be >= 1 and schedule.seg_start_epoch >= 0")
        if self.schedule.grad_accum < 1:
            raise ValueError(f"schedule.grad_accum must be >= 1, got {self.schedule.grad_accum}")
        if not 1 <= self.schedule.cam_layers <= self.model.depth:
            raise ValueError(
                f"schedule.cam_layers must be 1..model.depth ({self.model.depth}), got {self.schedule.cam_layers}"
            )

    @property
    def global_batch(self) -> int:
        return self.num_workers * self.stream.batch_size * self.schedule.grad_accum

    def run_uri(self) -> str:
        return self.output.rstrip("/") + "/runs/" + self.run_name


def cam_settings(cfg: ScheduleConfig) -> dict:
    """How training made its CAMs, as the exported model.json records it: labelling makes them the same way."""
    return {"layers": cfg.cam_layers, "p2p_refine": cfg.cam_p2p_refine}


def in_seg_phase(cfg: ScheduleConfig, epoch: int) -> bool:
    return epoch >= cfg.seg_start_epoch


def _cams(model: ClusterCAM, images: torch.Tensor, cfg: ScheduleConfig, train_mode: bool) -> torch.Tensor:
    was_training = model.training
    model.train(train_mode)
    try:
        return multi_scale_cam(model, images, cfg.cam_scales, cfg.cam_layers, cfg.cam_p2p_refine)
    finally:
        model.train(was_training)


def make_pseudo_labels(
    model: ClusterCAM,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: ScheduleConfig,
    unverified: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/method.md §b.3 step 2: multi-scale CAM (no grad) -> label-masked -> PAR pseudo labels.

    ``unverified``: unknown classes the classifier finds present (partial labels), whose CAM regions
    are ignored rather than background.
    """
    cams = _cams(model, images, cfg, cfg.cam_train_mode)
    return pseudo_labels(denormalize(images), cams, labels, cfg.bg_threshold, cfg.ignore_delta, unverified=unverified)


def cam_labels(model: ClusterCAM, images: torch.Tensor, labels: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """CAM + PAR labels at the central background threshold, every pixel decided (eval mode).

    The measure of pseudo-label quality: the training labels' ignore band would otherwise count
    as misses (or, excluded, flatter the figure).
    """
    cams = cam_to_label(_cams(model, images, cfg, False), labels)
    return refine_with_background(denormalize(images), cams, labels, (cfg.bg_threshold,))[0]


def micro_batch_losses(
    forward: Callable[..., object],
    model: ClusterCAM,
    images: torch.Tensor,
    labels: torch.Tensor,
    epoch: int,
    cfg: ScheduleConfig,
    ranks: Ranks = ONE_PROCESS,
    known: torch.Tensor | None = None,
) -> Losses:
    """One micro-batch: pseudo labels in the segmentation phase, the forward, and ``clustercam_loss``.

    ``forward`` is the module call (a DeepSpeed engine or the model itself), ``model`` the bare
    module used for the no-grad CAMs; ``ranks`` are the data-parallel ranks whose pixel counts the
    segmentation loss shares. ``known`` (B,K): the known mask of a dataset with partial labels (None:
    complete labels, the authors' recipe exactly). With ``unknown_labels=ignore`` the forward then
    runs first, so its class scores can name the unknown classes that look present (their CAM regions
    are ignored, not background); the order depends on the config and the dataset only, so every
    rank runs the same collectives (ZeRO-3 gathers weights in both passes).
    """
    seg_phase = in_seg_phase(cfg, epoch)
    if cfg.unknown_labels == "negative":
        known = None
    if known is None:
        pseudo = make_pseudo_labels(model, images, labels, cfg) if seg_phase else None
        out = forward(images, with_seg=seg_phase)
    else:
        out = forward(images, with_seg=seg_phase)
        unverified = (known == 0) & (out.cls_logits.detach() > 0)
        pseudo = make_pseudo_labels(model, images, labels, cfg, unverified) if seg_phase else None
    return clustercam_loss(out.cls_logits, out.pat_logits, labels, out.segs, pseudo, cfg.seg_loss_weight, ranks, known)


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Per-micro-step seed (drop path): a resumed run replays exactly what the lost one would have."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{micro_step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def steps_per_epoch(cfg: TrainConfig, total_samples: int) -> int:
    if cfg.schedule.steps_per_epoch > 0:
        return cfg.schedule.steps_per_epoch
    steps = total_samples // cfg.global_batch
    if steps < 1:
        raise ValueError(
            f"{cfg.data}: {total_samples} samples are fewer than one global batch of {cfg.global_batch} "
            "(num_workers x stream.batch_size x schedule.grad_accum)"
        )
    return steps


def stream_config(cfg: TrainConfig, steps: int) -> StreamConfig:
    """The per-rank stream: exactly ``steps * grad_accum`` micro-batches per epoch on every rank, its
    order and augmentation drawn from the run's seed as well as ``stream.seed``."""
    return dataclasses.replace(
        cfg.stream, epoch_batches=steps * cfg.schedule.grad_accum, seed=cfg.stream.seed + cfg.seed
    )


def train_one_process(cfg: TrainConfig) -> ClusterCAM:
    """The worker's schedule in this process, fp32, as one rank of ``cfg.num_workers=1``: per epoch a fresh
    stream, per micro-step the worker's rate, weight-decay phase, drop-path seed and ``micro_batch_losses``.

    What benchmarks and recipe sweeps train with when Ray and DeepSpeed are not what they measure; the
    model starts from its seeded random init (``cfg.weights`` is the worker's business)."""
    if cfg.num_workers != 1:
        raise ValueError(f"train_one_process runs one rank; num_workers is {cfg.num_workers}")
    info = read_dataset(cfg.data)
    steps = steps_per_epoch(cfg, info.total_samples)
    accum = cfg.schedule.grad_accum
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    optimizer = adamw(model, cfg.optim, lr=0.0)
    scfg = stream_config(cfg, steps)
    for epoch in range(cfg.schedule.epochs):
        batches = iter(train_loader(cfg.data, 0, 1, scfg, epoch=epoch))
        for step in range(epoch * steps, (epoch + 1) * steps):
            set_step_hyperparams(
                optimizer,
                learning_rate(cfg.optim, cfg.global_batch, cfg.schedule.epochs, steps, step),
                in_seg_phase(cfg.schedule, epoch),
            )
            optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                images, labels, known = next(batches)
                torch.manual_seed(step_seed(cfg.seed, 0, step * accum + micro))
                known = known if info.partial_labels else None
                losses = micro_batch_losses(model, model, images, labels, epoch, cfg.schedule, known=known)
                (losses.total / accum).backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
    model.cam_settings = cam_settings(cfg.schedule)  # as a loaded export carries them
    return model.eval()
