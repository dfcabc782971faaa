"""The labelling actor: one model per actor, loaded once, fed one work unit (a shard) per call.

The driver keeps two units queued per actor, so the next shard's call is waiting the moment the
current one returns. Inside a call, reading the shard, decoding, the model and the mask uploads
overlap (the host pool around the model: worker processes, or threads; ``system.label.hostpool``),
so the device waits on nothing but its own work. An actor gets only its unit's own resume state
(``UnitTask``: was the unit started by an earlier run?), never a job-wide set: in a started unit it
looks up each of the unit's keys' masks before decoding the image, skips those that exist and takes
their stats lines from the mask files. A finished unit ends with its record
(``system.label.records``), written after its masks.

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

import ray
import torch
from ray.experimental import tqdm_ray

from system import storage
from system.hardware import require_cuda
from system.label.config import LabelConfig
from system.label.hostpool import host_pool, host_workers
from system.label.infer import Labeller
from system.label.inputs import Unit, unit_samples
from system.label.outputs import OutputWriter
from system.label.previews import overlay, png_bytes
from system.label.records import UnitRef, build_record, write_record
from system.model import load_clustercam
from system.rejects import Reject
from system.telemetry import label_metrics, start_metrics_server_in_range

log = logging.getLogger("workers.label")
# Metrics ports an actor may take on its node: metrics_port + 1 ... metrics_port + ACTOR_PORTS (the
# first free one), so a pod declares this many ports whatever the number of actors in the job.
ACTOR_PORTS = 8


@dataclasses.dataclass(frozen=True)
class UnitTask:
    """One call's work: the unit, its record's name, and whether a run before started it (check its keys)."""

    unit: Unit
    ref: UnitRef
    started: bool


@dataclasses.dataclass
class UnitResult:
    """What one call returns to the driver: counts of the unit's keys met, its failures, whether it has its record."""

    unit: int
    images: int
    written: int
    skipped: int
    failures: list[dict]
    previews: list[tuple[str, bytes]]
    seconds: float
    tries: int = 1
    recorded: bool = False


class _ExistingMasks:
    """The keys of a started unit that already have a mask with its stats line (looked up one by one)."""

    def __init__(self, cfg: LabelConfig, found: dict[str, dict]):
        self.cfg = cfg
        self.found = found

    def __contains__(self, key: str) -> bool:
        if key in self.found:
            return True
        uri = storage.join(self.cfg.output, "masks", key + self.cfg.codec.suffix)
        try:
            line = self.cfg.codec.read_line(storage.get_bytes(uri))
        except FileNotFoundError:
            return False
        if line is None:
            return False
        self.found[key] = line
        return True


class UnitInterrupted(RuntimeError):
    """A unit stopped by a transient storage fault that outlasted the actor's own tries."""


@ray.remote(max_restarts=2, max_task_retries=2)
class LabelActor:
    def __init__(self, cfg: LabelConfig, class_names: list[str], run_id: str, index: int, model_id: str):
        if cfg.threads_per_actor > 0:
            torch.set_num_threads(cfg.threads_per_actor)
        self.cfg = cfg
        self.name = f"{index}"
        self.tag = (run_id, self.name)
        self.class_names = class_names
        self.run_id = run_id
        if ray.get_gpu_ids():
            require_cuda(f"label actor {index} (gpus_per_actor={cfg.gpus_per_actor})")
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        start = time.monotonic()
        model = load_clustercam(cfg.model).to(self.device)
        self.load_seconds = time.monotonic() - start
        self.labeller = Labeller(model, cfg, class_names)
        self.pool = host_pool(cfg)
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
            "host_workers": host_workers(self.cfg),
            "load_seconds": round(self.load_seconds, 3),
            "metrics_port": self.metrics_port,
        }

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_seconds.labels(*self.tag).observe(seconds)
        self.metrics.images_per_second.labels(*self.tag).set(n / max(seconds, 1e-9))

    def label(self, task: UnitTask, previews: int = 0) -> UnitResult:
        """Label one unit, trying again with backoff while storage fails transiently; then its record."""
        start, unit = time.monotonic(), task.unit
        self.writer.begin_unit()
        stored_before: set[str] = set()
        existing: dict[str, dict] = {}
        attempt = 0
        while True:
            attempt += 1
            try:
                storage.put_bytes(task.ref.marker(self.cfg.output), self.run_id.encode())
                result = self._label_once(task, previews, stored_before, existing)
                if result.recorded:
                    self._write_record(task, existing)
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

    def _write_record(self, task: UnitTask, existing: dict[str, dict]) -> None:
        written = [line["key"] for line in self.writer.unit_lines]
        failed = sorted(set(self.writer.unit_failed) - set(written) - set(existing))
        record, rows = build_record(
            task.ref,
            task.unit.uri,
            self.run_id,
            self.cfg.modes,
            self.class_names,
            [*existing.values(), *self.writer.unit_lines],
            written,
            sorted(existing),
            failed,
            len(existing),
        )
        write_record(self.cfg.output, task.ref, record, rows)

    def _label_once(
        self, task: UnitTask, previews: int, stored_before: set[str], existing: dict[str, dict]
    ) -> UnitResult:
        unit = task.unit
        failures, shown = [], []
        images = skipped = 0
        written_before = self.writer.written - len(stored_before)
        index = {name: k for k, name in enumerate(self.class_names)}
        known = _ExistingMasks(self.cfg, existing) if task.started and not self.cfg.overwrite else set()

        def samples():
            nonlocal images, skipped
            for sample in unit_samples(unit, index, _Skip(stored_before, known)):
                images += 1
                if isinstance(sample, str):
                    skipped += sample not in stored_before
                    continue
                yield sample

        def fail(item: Reject) -> None:
            failures.append(item.line())
            self.metrics.failures.labels(*self.tag, item.code).inc()

        recorded = True
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
            recorded = False  # a unit not read to its end is not done
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
        written = self.writer.written - written_before
        return UnitResult(unit.index, images, written, skipped, failures, shown, 0.0, recorded=recorded)


class _Skip:
    """Keys not to label again: stored by an interrupted try of this call, or found by ``_ExistingMasks``."""

    def __init__(self, stored: set[str], existing):
        self.stored = stored
        self.existing = existing

    def __contains__(self, key: str) -> bool:
        return key in self.stored or key in self.existing
