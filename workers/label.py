"""The labelling actor: one model per actor, loaded once, fed one work unit (a shard) per call.

The driver keeps two units queued per actor, so the next shard's call is waiting the moment the
current one returns. Inside a call, reading the shard, decoding, the model and the mask uploads
overlap (threads around the model), so the device waits on nothing but its own work. Keys that
already have a mask (the driver's one listing, shared through the object store) are skipped before
their images are decoded.

A transient storage fault (the object store restarting, a reset connection) is never recorded as a
failure of an image: the unit is tried again inside the actor with backoff, skipping the keys the
interrupted try already stored, and if the fault outlasts those tries the call fails and the driver
re-queues the unit.

Progress shows three ways: a Ray progress bar per actor (rendered by the driver), the driver's
rate/ETA log lines, and Prometheus series per actor (images, failures by reason, batch seconds,
images/s).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray.experimental import tqdm_ray

from system import storage
from system.hardware import require_cuda
from system.label.config import LabelConfig
from system.label.infer import Labeller
from system.label.inputs import Unit, unit_samples
from system.label.outputs import OutputWriter
from system.label.previews import overlay, png_bytes
from system.model import load_clustercam
from system.rejects import Reject
from system.telemetry import label_metrics, start_metrics_server_in_range

log = logging.getLogger("workers.label")
# Metrics ports an actor may take on its node: metrics_port + 1 ... metrics_port + ACTOR_PORTS (the
# first free one), so a pod declares this many ports whatever the number of actors in the job.
ACTOR_PORTS = 8


@dataclasses.dataclass
class UnitResult:
    """What one call returns to the driver: the unit's keys met (labelled, skipped or failed) and counts."""

    unit: int
    seen: list[str]
    written: int
    skipped: int
    failures: list[dict]
    previews: list[tuple[str, bytes]]
    seconds: float
    tries: int = 1


class UnitInterrupted(RuntimeError):
    """A unit stopped by a transient storage fault that outlasted the actor's own tries."""


@ray.remote(max_restarts=2, max_task_retries=2)
class LabelActor:
    def __init__(
        self, cfg: LabelConfig, class_names: list[str], run_id: str, index: int, done: frozenset, model_id: str
    ):
        if cfg.threads_per_actor > 0:
            torch.set_num_threads(cfg.threads_per_actor)
        self.cfg = cfg
        self.name = f"{index}"
        self.tag = (run_id, self.name)
        self.class_names = class_names
        self.done = done
        if ray.get_gpu_ids():
            require_cuda(f"label actor {index} (gpus_per_actor={cfg.gpus_per_actor})")
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        start = time.monotonic()
        model = load_clustercam(cfg.model).to(self.device)
        self.load_seconds = time.monotonic() - start
        self.labeller = Labeller(model, cfg, class_names)
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="label-io")
        # a restarted actor must not overwrite the parts of the instance it replaces
        self.writer = OutputWriter(cfg, class_names, run_id, f"a{index}-{uuid.uuid4().hex[:6]}", model_id, self.pool)
        self.metrics = label_metrics()
        self.metrics_port = (
            start_metrics_server_in_range(cfg.metrics_port + 1, ACTOR_PORTS, cfg.metrics_addr)
            if cfg.metrics_port
            else None
        )
        self.bar = tqdm_ray.tqdm(desc=f"label actor {index}", unit="img", position=index)

    def info(self) -> dict:
        return {
            "actor": self.name,
            "pid": os.getpid(),
            "device": str(self.device),
            "precision": self.labeller.precision.name,
            "threads": torch.get_num_threads(),
            "load_seconds": round(self.load_seconds, 3),
            "metrics_port": self.metrics_port,
        }

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_seconds.labels(*self.tag).observe(seconds)
        self.metrics.images_per_second.labels(*self.tag).set(n / max(seconds, 1e-9))

    def label(self, unit: Unit, previews: int = 0) -> UnitResult:
        """Label one unit, trying again with backoff while storage fails transiently."""
        start = time.monotonic()
        self.writer.begin_unit()
        stored_before: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._label_once(unit, previews, stored_before)
                result.seconds, result.tries = time.monotonic() - start, attempt
                return result
            except Exception as exc:
                if not storage.is_transient(exc):
                    raise
                self.writer.settle()
                stored_before = set(self.writer.stored)
                line = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                if attempt == self.cfg.unit_retries:
                    raise UnitInterrupted(
                        f"unit {unit.index} ({unit.uri}) interrupted {attempt} times by storage faults, last: {line}"
                    ) from None
                delay = 2.0 * 2 ** (attempt - 1)
                log.warning(
                    "unit %d: storage fault (%s), try %d of %d again in %.0f s",
                    unit.index,
                    line,
                    attempt + 1,
                    self.cfg.unit_retries,
                    delay,
                )
                time.sleep(delay)

    def _label_once(self, unit: Unit, previews: int, stored_before: set[str]) -> UnitResult:
        seen, failures, shown = [], [], []
        skipped = 0
        written_before = self.writer.written - len(stored_before)
        index = {name: k for k, name in enumerate(self.class_names)}
        skip = self.done | stored_before if stored_before else self.done

        def samples():
            nonlocal skipped
            for sample in unit_samples(unit, index, skip):
                if isinstance(sample, str):
                    seen.append(sample)
                    skipped += sample not in stored_before
                    continue
                seen.append(sample.key)
                yield sample

        def fail(item: Reject) -> None:
            failures.append(item.line())
            self.metrics.failures.labels(*self.tag, item.code).inc()

        try:
            for item in self.labeller.label(samples(), self.pool, self._on_batch):
                self.writer.submit(item)
                if isinstance(item, Reject):
                    fail(item)
                    continue
                self.metrics.images.labels(*self.tag).inc()
                self.bar.update(1)
                if len(shown) < previews:
                    mode = self.cfg.modes[-1]
                    tags = ", ".join(self.class_names[k] for k in item.sample.labels) or "-"
                    title = f"{item.sample.key} [{mode}] tags: {tags}"
                    shown.append(
                        (item.sample.key, png_bytes(overlay(item.pixels, item.masks[mode], self.class_names, title)))
                    )
                for lost in self.writer.collect():
                    fail(lost)
        except (OSError, ValueError) as exc:
            if storage.is_transient(exc):
                raise
            fail(
                Reject(
                    "",
                    unit.uri,
                    "unit_unreadable",
                    f"unit {unit.index} could not be read ({type(exc).__name__}: {exc})",
                )
            )
        for lost in self.writer.close():
            fail(lost)
        return UnitResult(unit.index, seen, self.writer.written - written_before, skipped, failures, shown, 0.0)
