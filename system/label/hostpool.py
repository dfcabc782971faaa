"""The actor's host pool: where decoding and resizing, and mask encoding and uploading, run beside the model.

JPEG decoding, PNG encoding and the stats of a mask are CPU work in Python and C; in threads of the
model's own process they share its GIL, so on a GPU host the device waits on them. With
``host_workers`` > 0 they run in that many worker processes, started once per actor with the 'spawn'
context (never a fork of a process that holds CUDA or Ray threads). What crosses the boundary is our
own plain data (``Sample``, ``Decoded``, ``Labelled``, numpy arrays, a ``WriteContext``) between our own
processes, never a file's contents interpreted as objects. The work submitted is module functions
(``infer.decode_sample``, ``outputs.store_masks``), the same the thread path runs, so the masks and
lines are bit-identical either way. The callers keep windows of work in flight, so memory stays flat.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from system.label.config import LabelConfig


def host_workers(cfg: LabelConfig) -> int:
    """Worker processes for an actor: ``host_workers``, or with -1 every reserved CPU but the model's one."""
    if cfg.host_workers >= 0:
        return cfg.host_workers
    return max(0, math.floor(cfg.cpus_per_actor) - 1)


def _worker_init() -> None:
    import torch  # the workers' only torch work is a mask's confusion counts: one thread each

    torch.set_num_threads(1)


def host_pool(cfg: LabelConfig) -> Executor:
    """Worker processes when ``host_workers`` resolves above 0, else ``decode_threads`` threads."""
    workers = host_workers(cfg)
    if workers == 0:
        return ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="label-io")
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
