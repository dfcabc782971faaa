"""The labelling job's typed config (``python -m pipelines.label [--config FILE] key=value ...``).

It lives in ``system`` rather than in the pipeline because the Ray actor that does the work needs the
same settings and may not import ``pipelines``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from system.cam import INFER_SCALES, TRAIN_CAM_SCALES
from system.config import option
from system.hardware import Precision
from system.masks import MASK_CODECS, MaskCodec, mask_codec

Mode = Literal["seg", "cam", "both"]
MaskFormat = Literal[tuple(MASK_CODECS)]  # type: ignore[valid-type]


@dataclasses.dataclass
class LabelConfig:
    """Bulk pseudo-label generation: masks, stats, previews and label_job.json under ``output``."""

    model: str = option(
        doc="exported model directory (model.safetensors + model.json) or a checkpoint file; path or s3:// URI"
    )
    data: str = option(
        doc="dataset URI (folder with dataset.json + shards) or a manifest (.jsonl/.csv of id, image, labels[, mask])"
    )
    output: str = option(doc="job folder or s3:// prefix: masks/, stats/, failures/, previews/, label_job.json")
    mode: Mode = option(
        "seg",
        doc="seg: multi-scale segmentation head (docs/method.md §c.1); cam: CAM + PAR pseudo labels "
        "(docs/method.md §b.4-b.7); both: seg in masks/, cam in cam_masks/",
    )
    scales: list[float] = option(factory=lambda: list(INFER_SCALES), doc="seg: test-time scales")
    cam_scales: list[float] = option(factory=lambda: list(TRAIN_CAM_SCALES), doc="cam: CAM scales (1.0 always runs)")
    cam_layers: int | None = option(
        None,
        doc="cam: last blocks whose class-to-patch attention gates the CAM (docs/method.md §a.7); "
        "null: as the model was trained (its model.json), else 3",
    )
    cam_p2p_refine: bool | None = option(
        None,
        doc="cam: refine along patch-to-patch attention (docs/method.md §a.7); "
        "null: as the model was trained (its model.json), else true",
    )
    bg_threshold: float = option(0.4, doc="cam: background threshold (docs/method.md §b.7; COCO recipe 0.43)")
    ignore_delta: float = option(0.1, doc="cam: half width of the ignore band around bg_threshold")
    mask_format: MaskFormat = option(
        "png", doc="how masks are stored (system.masks codecs): png = 8-bit palette PNG with the stats line embedded"
    )
    restrict_to_tags: bool = option(True, doc="seg: only background and the image's tagged classes may win a pixel")
    class_names: list[str] = option(
        factory=list, doc="class names in model order, needed for an authors' checkpoint without model.json"
    )
    batch_size: int = option(8, doc="images per forward (images of the same size after capping)")
    max_side: int = option(
        1024, doc="images with a longer side are resized for the model; the mask is resized back (nearest)"
    )
    precision: Precision = option(
        "auto", doc="auto: bf16 autocast on GPU and on CPUs with native bf16, else fp32; fp16: GPU only"
    )
    crf: bool = option(
        False,
        doc="seg: dense CRF on the probabilities (docs/method.md §c.1 step 3); needs the 'crf' extra (pydensecrf)",
    )
    overwrite: bool = option(False, doc="recompute masks that already exist")
    num_actors: int = option(1, doc="labelling actors (one model copy each)")
    cpus_per_actor: float = option(0.5, doc="Ray CPUs reserved per actor (fractional, so read tasks are never starved)")
    gpus_per_actor: float = option(
        -1.0,
        doc="Ray GPUs per actor; -1: 1 when the cluster has GPUs when the job starts, else 0 (an autoscaling "
        "cluster scaled to zero has none: ask for 1 explicitly there)",
    )
    actor_start_timeout_s: float = option(
        900.0,
        doc="seconds the actors may take to be placed and load the model (an autoscaler adding GPU nodes) "
        "before the job stops, naming the resources asked for",
    )
    threads_per_actor: int = option(0, doc="torch CPU threads per actor; 0: Ray's default (max(1, cpus_per_actor))")
    decode_threads: int = option(2, doc="threads per actor decoding images and writing masks while the model runs")
    host_workers: int = option(
        -1,
        doc="worker processes per actor decoding/resizing images and encoding/uploading masks beside the model "
        "(free of the model's GIL); 0: decode_threads threads in the actor; -1: floor(cpus_per_actor) - 1",
    )
    manifest_chunk: int = option(256, doc="manifest images per work unit (a dataset's unit is one shard)")
    unit_retries: int = option(
        3, doc="tries of a unit inside its actor when storage fails transiently (backoff 2, 4, 8 s ...)"
    )
    unit_attempts: int = option(
        4,
        doc="calls of a unit the driver makes (a failed call is re-queued with backoff) "
        "before the job gives up on it and exits incomplete (status 3)",
    )
    flush_every: int = option(256, doc="stats/failure lines buffered per actor before a part file is written")
    num_previews: int = option(8, doc="overlay previews (and contact sheet tiles) written under previews/")
    metrics_port: int = option(0, doc="Prometheus port of the driver; actors use the following ports; 0: off")
    metrics_addr: str = option(
        "127.0.0.1", doc="address the metrics endpoints bind to (0.0.0.0 for a Prometheus on another host)"
    )
    export: str = option(
        "",
        doc="comma-separated exports written under exports/ once the job is complete: coco, labelstudio "
        "(python -m pipelines.export with its defaults; run that for other settings)",
    )

    def __post_init__(self) -> None:
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in (
            "batch_size",
            "num_actors",
            "decode_threads",
            "manifest_chunk",
            "flush_every",
            "max_side",
            "cam_layers",
            "unit_retries",
            "unit_attempts",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {self.scales}")
        if not self.cam_scales or min(self.cam_scales) <= 0:
            raise ValueError(f"cam_scales must be a non-empty list of positive numbers, got {self.cam_scales}")
        if not 0 < self.actor_start_timeout_s:
            raise ValueError(f"actor_start_timeout_s must be positive, got {self.actor_start_timeout_s}")
        if self.host_workers < -1:
            raise ValueError(f"host_workers must be -1 (auto), 0 (threads) or a count, got {self.host_workers}")
        if not 0 < self.cpus_per_actor:
            raise ValueError(f"cpus_per_actor must be positive, got {self.cpus_per_actor}")
        if self.crf and self.mode == "cam":
            raise ValueError("crf applies to seg masks; mode=cam has none")
        from system.label.exports import parse_formats  # imported here: exports -> outputs -> this module

        parse_formats(self.export)

    @property
    def modes(self) -> tuple[str, ...]:
        """Outputs in write order: the last one goes to masks/ and marks the image done."""
        return {"seg": ("seg",), "cam": ("cam",), "both": ("cam", "seg")}[self.mode]

    @property
    def codec(self) -> MaskCodec:
        return mask_codec(self.mask_format)

    def mask_dir(self, mode: str) -> str:
        return "cam_masks" if self.mode == "both" and mode == "cam" else "masks"
