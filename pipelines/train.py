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
import sys
from urllib.parse import urlparse

from system import storage
from system.config import dump_yaml, parse_cli, to_dict
from system.data.shards import read_dataset
from system.model import read_state_dict
from system.training import TrainConfig, steps_per_epoch

log = logging.getLogger("clustercam.train")


class PreflightError(RuntimeError):
    """The run cannot start; the message names the input at fault."""


def preflight(cfg: TrainConfig) -> dict:
    """Checks that need no cluster; returns the training dataset's ``dataset.json``."""
    try:
        storage.check_readable(cfg.data)
        info = read_dataset(cfg.data)
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        raise PreflightError(f"data: {exc}") from exc
    classes = len(info["classes"])
    if classes != cfg.model.num_classes:
        raise PreflightError(
            f"data: {cfg.data} has {classes} classes but model.num_classes is {cfg.model.num_classes}"
        )
    steps_per_epoch(cfg, info["total_samples"])
    if cfg.validation.data:
        try:
            val = read_dataset(cfg.validation.data)
        except (FileNotFoundError, ValueError, storage.StorageError) as exc:
            raise PreflightError(f"validation.data: {exc}") from exc
        if list(val["classes"]) != list(info["classes"]):
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
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return runs.removeprefix("s3://"), pyarrow.fs.S3FileSystem(region=region, **kwargs)


def run(cfg: TrainConfig):
    """Run (or resume) the training; returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.cluster import start_ray
    from workers.train import train_loop_per_worker

    info = preflight(cfg)
    storage.put_bytes(cfg.run_uri() + "/config.yaml", dump_yaml(cfg).encode())
    start_ray(storage.aws_env())
    storage_path, filesystem = run_storage(cfg)
    log.info(
        "training %s: %d samples, %d classes, %d workers x batch %d x accumulation %d = global batch %d -> %s",
        cfg.run_name, info["total_samples"], len(info["classes"]), cfg.num_workers, cfg.stream.batch_size,
        cfg.schedule.grad_accum, cfg.global_batch, cfg.run_uri(),
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
    return trainer.fit()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(TrainConfig, argv, prog="python -m pipelines.train")
    try:
        result = run(cfg)
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = {
        "run": cfg.run_uri(),
        "model": cfg.run_uri() + "/model",
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": result.metrics,
    }
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
