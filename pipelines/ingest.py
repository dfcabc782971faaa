"""Ingest an image-tag dataset (VOC, COCO, OpenImages, a manifest, WebDataset tars, or synthetic) into shards.

    python -m pipelines.ingest [--config FILE] key=value ...
    python -m pipelines.ingest source.format=voc source.path=/data/VOC2012 source.split=train \\
        output=s3://bucket/datasets/voc-train shard_size=1000 num_workers=8

One Ray task per shard (``workers/ingest.py``), at most ``num_workers`` in flight; a shard whose task
fails is retried with backoff, and one that still fails leaves the dataset unpublished (no
``dataset.json``, exit status 3). Joins the Ray cluster named by ``RAY_ADDRESS`` (as under ``ray job
submit``) or starts a local one. Re-running skips complete shards, so a killed ingest is resumed by
running the same command again. ``python -m pipelines.ingest --help`` lists the keys.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipelines.cluster import start_ray
from pipelines.entry import Incomplete, run_main
from pipelines.fanout import fan_out
from system import storage
from system.config import dump_yaml, option, parse_cli, to_dict
from system.data import ingest
from system.data.shards import DatasetInfo, shard_name
from system.data.sources import SourceConfig, build_source
from system.data.validate import Verify
from system.telemetry import Progress, ingest_metrics, setup_logging, start_metrics_server

log = logging.getLogger("pipelines.ingest")


@dataclass
class IngestConfig:
    """Ingest an image-tag dataset into WebDataset shards."""

    output: str = option(doc="dataset URI: s3://bucket/datasets/<name> or a local folder")
    source: SourceConfig = option(factory=SourceConfig, doc="input dataset")
    name: str = option("", doc="dataset name (default: the last part of output)")
    shard_size: int = option(1000, doc="inputs per shard (a shard holds fewer when some are rejected)")
    num_workers: int = option(2, doc="shards written in parallel (Ray tasks in flight)")
    shard_attempts: int = option(
        4,
        doc="tries of a shard whose task fails (storage outage, lost worker) before the "
        "ingest gives up on it and exits incomplete (status 3)",
    )
    max_pixels: int = option(50_000_000, doc="images with more pixels are rejected")
    load_threads: int = option(
        8, doc="inputs one shard task reads and checks at once (URL fetches, S3 reads), kept in order"
    )
    verify: Verify = option(
        "structure",
        doc="structure: file structure without a decode (JPEG markers, tables, restart "
        "markers and scan sizes; PNG chunks, CRCs and the inflated pixel-data size); decode: the "
        "structure check, then a decode of every image (JPEG at 1/8 scale)",
    )
    progress_every_s: float = option(10.0, doc="seconds between progress lines")
    metrics_port: int = option(0, doc="Prometheus port of the driver (clustercam_ingest_*); 0: off")
    metrics_addr: str = option(
        "127.0.0.1", doc="address the metrics endpoint binds to (0.0.0.0 for a Prometheus on another host)"
    )


def run(cfg: IngestConfig) -> DatasetInfo:
    """Run the ingest; returns what it wrote to ``dataset.json``."""
    output = cfg.output.rstrip("/")
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {cfg.num_workers}")
    if cfg.load_threads < 1:
        raise ValueError(f"load_threads must be at least 1, got {cfg.load_threads}")
    if cfg.shard_attempts < 1:
        raise ValueError(f"shard_attempts must be at least 1, got {cfg.shard_attempts}")
    storage.check_writable(output)
    if cfg.source.path and "{" not in cfg.source.path:  # a brace pattern's tars are opened one by one
        storage.check_readable(cfg.source.path)
    source = build_source(cfg.source)
    settings = {"source": to_dict(cfg.source), "max_pixels": cfg.max_pixels, "verify": cfg.verify}
    work = ingest.plan(source, cfg.shard_size, settings)
    try:
        return _write(cfg, output, source, work)
    finally:
        work.groups.close()


def _write(cfg: IngestConfig, output: str, source, work: ingest.IngestPlan) -> DatasetInfo:
    """Write the planned shards that are not done yet, then the dataset's records."""
    groups = work.groups

    def task(index: int) -> ingest.ShardTask:
        return ingest.ShardTask(
            index,
            groups[index],
            output,
            source.class_names,
            groups.fingerprints[index],
            cfg.max_pixels,
            cfg.verify,
            cfg.load_threads,
        )

    ingest.put_if_changed(storage.join(output, "ingest.yaml"), dump_yaml(cfg).encode())

    def done_before(index: int) -> dict | None:
        record = ingest.read_part(output, index)
        if (
            record
            and record.get("fingerprint") == groups.fingerprints[index]
            and storage.exists(storage.join(output, shard_name(index)))
        ):
            return record
        return None

    with ThreadPoolExecutor(16) as pool:
        parts = list(pool.map(done_before, range(len(work.groups))))
    todo = [i for i, record in enumerate(parts) if record is None]
    log.info(
        "ingest: %d inputs, %d shards (%d already complete), %d rejected while listing -> %s",
        work.inputs,
        len(work.groups),
        len(work.groups) - len(todo),
        len(work.rejects),
        output,
    )
    run_name = cfg.name or output.rsplit("/", 1)[-1]
    metrics = ingest_metrics()
    todo_inputs = sum(groups.sizes[i] for i in todo)
    metrics.inputs.labels(run_name).set(work.inputs)
    metrics.done_inputs.labels(run_name).inc(work.inputs - todo_inputs)
    for reject in work.rejects:
        metrics.rejects.labels(run_name, reject["code"]).inc()
    if cfg.metrics_port:
        start_metrics_server(cfg.metrics_port, cfg.metrics_addr)
    if todo:
        ray = start_ray()
        from workers.ingest import ingest_shard

        source_ref = ray.put(source)
        progress = Progress(todo_inputs, "ingest inputs", log.info, cfg.progress_every_s)

        def done(index: int, record: dict) -> None:
            parts[index] = record
            metrics.shards.labels(run_name).inc()
            metrics.samples.labels(run_name).inc(record["samples"])
            metrics.done_inputs.labels(run_name).inc(record["inputs"])
            for reject in record["rejects"]:
                metrics.rejects.labels(run_name, reject["code"]).inc()
            progress.update(record["inputs"])

        lost = fan_out(
            todo,
            range(cfg.num_workers),
            lambda _, i: ingest_shard.remote(source_ref, task(i)),
            done,
            attempts=cfg.shard_attempts,
            name=shard_name,
        )
        if lost:
            raise Incomplete(
                f"{len(lost)} of {len(work.groups)} shards of {output} not written (first: "
                f"{shard_name(lost[0].unit)}: {lost[0].error}); dataset.json was not written"
            )
    info = ingest.finalize(
        output,
        run_name,
        source.class_names,
        parts,
        work.rejects,
        work.inputs,
        to_dict(cfg.source),
    )
    log.info(
        "ingest: %d samples in %d shards, %d rejected (%s) -> %s",
        info.total_samples,
        len(info.shards),
        info.rejected.total,
        info.rejected.by_code,
        output,
    )
    return info


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_cli(IngestConfig, argv, prog="python -m pipelines.ingest")
    run_main("ingest", lambda: run(cfg))


if __name__ == "__main__":
    main()
