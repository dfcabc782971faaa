"""The Ray task that exports one chunk of a finished job's masks; the work is ``system.label.exports``.

A chunk whose task fails (a storage outage outlasting botocore's retries, a lost worker) is re-queued
by the driver with backoff (``pipelines.fanout``); its part files are written atomically, so a retry
starts clean.
"""

from __future__ import annotations

import ray

from system.label.exports import ChunkResult, ExportChunk, ExportSpec, export_chunk


@ray.remote(num_cpus=1, max_retries=3)
def export_chunk_task(spec: ExportSpec, chunk: ExportChunk) -> ChunkResult:
    return export_chunk(spec, chunk)
