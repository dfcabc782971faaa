"""Train ClusterCAM: ``python -m pipelines.train [--config FILE] key=value ...``.

Everything that can be checked before a worker starts is checked here (the dataset exists and has
as many classes as the model, the storage root is writable, the initial weights read as a
checkpoint), so a typo costs seconds, not a cluster start-up. Then a Ray Train ``TorchTrainer`` runs
``workers.train.train_loop_per_worker`` on ``num_workers`` DeepSpeed ranks; the run lives in
``<output>/runs/<run_name>`` (Ray's checkpoints, the resolved config, the exported ``model/``), and
re-running with the same ``run_name`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import urlparse

from pipelines.entry import BadInput, Incomplete, run_main
from system import storage
from system.config import dump_yaml, parse_cli, to_dict
from system.data.shards import DatasetInfo, read_dataset
from system.model import read_state_dict
from system.telemetry import setup_logging
from system.training import TrainConfig, steps_per_epoch

log = logging.getLogger("clustercam.train")


class PreflightError(BadInput):
    """The run cannot start; the message names the input at fault."""


def preflight(cfg: TrainConfig) -> DatasetInfo:
    """Checks that need no cluster; returns the training dataset's ``dataset.json``."""
    try:
        storage.check_readable(cfg.data)
        info = read_dataset(cfg.data)
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        raise PreflightError(f"data: {exc}") from exc
    classes = len(info.classes)
    if classes != cfg.model.num_classes:
        raise PreflightError(f"data: {cfg.data} has {classes} classes but model.num_classes is {cfg.model.num_classes}")
    steps_per_epoch(cfg, info.total_samples)
    if cfg.validation.data:
        try:
            val = read_dataset(cfg.validation.data)
        except (FileNotFoundError, ValueError, storage.StorageError) as exc:
            raise PreflightError(f"validation.data: {exc}") from exc
        if val.classes != info.classes:
            raise PreflightError(f"validation.data: {cfg.validation.data} has other classes than {cfg.data}")
    try:
        storage.check_writable(cfg.run_uri())
    except storage.StorageError as exc:
        raise PreflightError(f"output: {exc}") from exc
    if cfg.weights:
        try:
            read_state_dict(cfg.weights)
        except Exception as exc:
            raise PreflightError(f"weights: {exc}") from exc
    return info


def run_storage(cfg: TrainConfig):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig: ``<output>/runs``."""
    runs = cfg.output.rstrip("/") + "/runs"
    if not storage.is_s3(runs):
        return os.path.abspath(runs.removeprefix("file://")), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
    # no keys here: Ray ships this object to its controller and workers, and each resolves the AWS
    # credential chain (its node's environment, profile or instance identity) where it runs
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return runs.removeprefix("s3://"), pyarrow.fs.S3FileSystem(region=region, **kwargs)


def run(cfg: TrainConfig):
    """Run (or resume) the training; returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.cluster import start_ray
    from workers.train import train_loop_per_worker

    info = preflight(cfg)
    storage.put_bytes(cfg.run_uri() + "/config.yaml", dump_yaml(cfg).encode())
    start_ray()
    storage_path, filesystem = run_storage(cfg)
    log.info(
        "training %s: %d samples, %d classes, %d workers x batch %d x accumulation %d = global batch %d -> %s",
        cfg.run_name,
        info.total_samples,
        len(info.classes),
        cfg.num_workers,
        cfg.stream.batch_size,
        cfg.schedule.grad_accum,
        cfg.global_batch,
        cfg.run_uri(),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        if not _resumable(exc):
            raise
        raise Incomplete(
            f"training {cfg.run_uri()} stopped before its last step ({_first_line(exc)}); its latest "
            "checkpoint is kept and a re-run resumes from it"
        ) from exc


def _resumable(exc: BaseException) -> bool:
    """Lost workers, preemption and storage outages: a re-run resumes; a failure in our code does not pass."""
    import ray.exceptions
    from ray.train import WorkerGroupError
    from ray.train.v2.api.exceptions import PreemptionError

    lost = (
        ray.exceptions.ActorDiedError,
        ray.exceptions.ActorUnavailableError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.ObjectLostError,
    )
    if isinstance(exc, PreemptionError):
        return True
    if not isinstance(exc, WorkerGroupError) or not exc.worker_failures:
        return False
    return all(
        isinstance(e, lost) or storage.is_transient(getattr(e, "cause", None) or e)
        for e in exc.worker_failures.values()
    )


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip() and "Training failed" not in line]
    return lines[0].strip()[:300] if lines else type(exc).__name__


def _train_and_report(cfg: TrainConfig) -> None:
    result = run(cfg)
    if not storage.exists(cfg.run_uri() + "/model/model.json"):
        raise Incomplete(f"training {cfg.run_uri()} ended without exporting {cfg.run_uri()}/model")
    summary = {
        "run": cfg.run_uri(),
        "model": cfg.run_uri() + "/model",
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": result.metrics,
    }
    print(json.dumps(summary, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_cli(TrainConfig, argv, prog="python -m pipelines.train")
    run_main("train", lambda: _train_and_report(cfg))


if __name__ == "__main__":
    main()
