"""The Ray task that writes one shard; the work itself is ``system.data.ingest.write_shard``.

A task that fails on storage or network errors is retried by Ray (the shard write is atomic, so a
retry starts clean); a bad input never fails a task, it becomes a reject.
"""

from __future__ import annotations

import botocore.exceptions
import ray

from system.data.ingest import ShardTask, write_shard
from system.storage import StorageError


@ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError, StorageError, botocore.exceptions.BotoCoreError])
def ingest_shard(source, task: ShardTask) -> dict:
    return write_shard(source, task)
