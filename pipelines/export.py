"""Export a finished labelling job's masks for other tools: COCO RLE annotations, Label Studio tasks.

    python -m pipelines.export job=s3://b/labels/coco-train [formats=coco,labelstudio] key=value ...
    python -m pipelines.label ... export=coco,labelstudio     # the same, right after a complete job

Writes ``<output>/exports/<format>/`` (``system.label.exports``: parts, ``index.json`` last). The
masks are listed as a stream and cut into chunks of ``chunk_size`` keys, one Ray task each and at
most ``num_workers`` in flight, so the driver holds a small record per chunk, never a per-image
collection. Joins the Ray cluster in ``RAY_ADDRESS`` or starts a local one. Exits 0 only when every
mask is in every format's parts and the index names them; 2 when the job is not a finished one, the
output cannot be written or a mask cannot be exported (the message names it); 3 when chunks were
lost to a transient fault (re-running finishes the export).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Iterator

from pipelines.cluster import start_ray
from pipelines.entry import Incomplete, run_main
from pipelines.fanout import fan_out
from system import storage
from system.config import option, parse_cli
from system.label.exports import (
    EXPORTS_DIR,
    ChunkResult,
    ExportChunk,
    ExportJob,
    ExportSpec,
    check_image_name,
    commit_index,
    parse_formats,
)
from system.masks import mask_codec
from system.telemetry import Progress, setup_logging

log = logging.getLogger("pipelines.export")


@dataclasses.dataclass
class ExportConfig:
    """Export a finished labelling job's masks: COCO RLE annotations, Label Studio pre-annotations."""

    job: str = option(doc="the labelling job's output folder or s3:// prefix (label_job.json and masks/)")
    formats: str = option(
        "coco,labelstudio",
        doc="comma-separated: coco (COCO-style semantic annotations, RLE masks), "
        "labelstudio (pre-annotation tasks, brush RLE)",
    )
    output: str = option("", doc="folder or s3:// prefix that receives exports/<format>/; empty: the job's folder")
    image_name: str = option(
        "",
        doc="each image's COCO file_name and Label Studio data.image: a template over {id}, {key}, {source} "
        "(e.g. s3://b/coco/train2017/{id}.jpg); empty: the image URI of a manifest job, {id}.jpg for a "
        "dataset job (its images live inside shards)",
    )
    chunk_size: int = option(1000, doc="masks per part file (one Ray task each)")
    num_workers: int = option(4, doc="chunks exported in parallel (Ray tasks in flight)")
    chunk_attempts: int = option(
        4, doc="calls of a chunk whose task fails before the export gives up on it and exits incomplete (status 3)"
    )
    read_threads: int = option(8, doc="threads per task reading mask files")

    def __post_init__(self) -> None:
        if not self.job:
            raise ValueError("job must not be empty")
        for name in ("chunk_size", "num_workers", "chunk_attempts", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not parse_formats(self.formats):
            raise ValueError("formats must name at least one of coco, labelstudio")
        check_image_name(self.image_name)


def _check_uri(key: str, uri: str) -> None:
    """Only s3:// URIs and local paths are storage: ``https://...`` would become a local folder named https:."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("", "s3", "file"):
        raise ValueError(f"{key}={uri!r}: not an s3:// URI or a local path ({scheme}:// is not storage)")


def _chunks(keys: Iterable[str], size: int) -> Iterator[ExportChunk]:
    batch: list[str] = []
    index = 0
    for key in keys:
        batch.append(key)
        if len(batch) == size:
            yield ExportChunk(index, tuple(batch))
            index, batch = index + 1, []
    if batch:
        yield ExportChunk(index, tuple(batch))


def mask_keys(job: ExportJob) -> Iterator[str]:
    """The job's mask keys in key order, streamed from the listing of ``masks/``."""
    suffix = mask_codec(job.mask_format).suffix
    prefix = job.masks_uri.rstrip("/") + "/"
    for uri in storage.iter_uris(job.masks_uri):
        name = uri[len(prefix) :]
        if name.endswith(suffix) and "/" not in name:
            yield name[: -len(suffix)]


def run(cfg: ExportConfig) -> dict[str, dict]:
    """Export; returns each format's ``index.json`` content."""
    job_uri = cfg.job.rstrip("/")
    output = storage.join(cfg.output.rstrip("/") or job_uri, EXPORTS_DIR)
    _check_uri("job", job_uri)
    _check_uri("output", output)
    storage.check_readable(job_uri)
    job = ExportJob.read(job_uri)
    storage.check_writable(output)
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    spec = ExportSpec(
        job=job,
        formats=parse_formats(cfg.formats),
        output=output,
        run=run_id,
        image_name=cfg.image_name,
        chunk_size=cfg.chunk_size,
        read_threads=cfg.read_threads,
    )
    log.info(
        "export %s: %s of %s (%s job, run %s) -> %s", run_id, ",".join(spec.formats), job_uri, job.kind, job.run, output
    )
    ray = start_ray()
    from workers.export import export_chunk_task

    spec_ref = ray.put(spec)
    results: list[ChunkResult] = []
    progress = Progress(job.mask_count or None, "export masks", log.info)

    def done(chunk: ExportChunk, result: ChunkResult) -> None:
        results.append(result)
        progress.update(len(chunk.keys))

    lost = fan_out(
        _chunks(mask_keys(job), cfg.chunk_size),
        range(cfg.num_workers),
        lambda _, chunk: export_chunk_task.remote(spec_ref, chunk),
        done,
        attempts=cfg.chunk_attempts,
        name=lambda chunk: f"export chunk {chunk.index} ({chunk.keys[0]}...)",
    )
    if lost:
        raise Incomplete(
            f"{len(lost)} chunks of {job_uri}'s masks not exported (first: chunk {lost[0].unit.index}: "
            f"{lost[0].error}); no index.json was written"
        )
    failed = sum(result.failed for result in results)
    if failed:
        first = min((r for r in results if r.errors), key=lambda r: r.index).errors[0]
        raise ValueError(f"{failed} masks of {job_uri} cannot be exported (first: {first}); no index.json was written")
    indexes = {fmt: commit_index(spec, fmt, results) for fmt in spec.formats}
    for fmt, index in indexes.items():
        log.info(
            "export %s: %s: %d images in %d parts -> %s",
            run_id,
            fmt,
            index["images"],
            len(index["parts"]),
            storage.join(output, fmt),
        )
    return indexes


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_cli(ExportConfig, argv, prog="python -m pipelines.export")
    run_main("export", lambda: run(cfg))


if __name__ == "__main__":
    main()
