"""The Ray task that writes one shard; the work itself is ``system.data.ingest.write_shard``.

The driver re-queues a shard whose task fails (``pipelines.fanout``), with backoff, so a storage
outage longer than botocore's own retries costs time, not the ingest; the shard write is atomic, so
a retry starts clean. A bad input never fails a task, it becomes a reject.
"""

from __future__ import annotations

import ray

from system.data.ingest import ShardTask, write_shard


@ray.remote(num_cpus=1, max_retries=3)
def ingest_shard(source, task: ShardTask) -> dict:
    return write_shard(source, task)
