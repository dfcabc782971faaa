"""The labelling actor: one model per actor, loaded once, fed one work unit (a shard) per call.

The driver keeps two units queued per actor, so the next shard's call is waiting the moment the
current one returns. Inside a call, reading the shard, decoding, the model and the mask uploads
overlap (threads around the model), so the device waits on nothing but its own work. Keys that
already have a mask (the driver's one listing, shared through the object store) are skipped before
their images are decoded.

Progress shows three ways: a Ray progress bar per actor (rendered by the driver), the driver's
rate/ETA log lines, and Prometheus series per actor (images, failures by reason, batch seconds,
images/s).
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray.experimental import tqdm_ray

from system.label.config import LabelConfig
from system.label.infer import Failure, Labeller
from system.label.inputs import Unit, unit_samples
from system.label.outputs import OutputWriter
from system.label.previews import overlay, png_bytes
from system.model import load_clustercam
from system.telemetry import label_metrics, start_metrics_server


@ray.remote(max_restarts=2, max_task_retries=2)
class LabelActor:
    def __init__(self, cfg: LabelConfig, class_names: list[str], run_id: str, index: int, done: frozenset, model_id: str):
        if cfg.threads_per_actor > 0:
            torch.set_num_threads(cfg.threads_per_actor)
        self.cfg = cfg
        self.name = f"{index}"
        self.class_names = class_names
        self.done = done
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        start = time.monotonic()
        model = load_clustercam(cfg.model).to(self.device)
        self.load_seconds = time.monotonic() - start
        self.labeller = Labeller(model, cfg, class_names)
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="label-io")
        # a restarted actor must not overwrite the parts of the instance it replaces
        self.writer = OutputWriter(cfg, class_names, run_id, f"a{index}-{uuid.uuid4().hex[:6]}", model_id, self.pool)
        self.metrics = label_metrics()
        self.metrics_port = start_metrics_server(cfg.metrics_port + 1 + index, cfg.metrics_addr) if cfg.metrics_port else None
        self.bar = tqdm_ray.tqdm(desc=f"label actor {index}", unit="img", position=index)

    def info(self) -> dict:
        return {"actor": self.name, "pid": os.getpid(), "device": str(self.device), "precision": self.labeller.precision,
                "threads": torch.get_num_threads(), "load_seconds": round(self.load_seconds, 3), "metrics_port": self.metrics_port}

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_seconds.labels(self.name).observe(seconds)
        self.metrics.images_per_second.labels(self.name).set(n / max(seconds, 1e-9))

    def label(self, unit: Unit, previews: int = 0) -> dict:
        """Label one unit; returns its keys and counts (failures are also written to failures/)."""
        start = time.monotonic()
        seen, skipped, failures, shown = [], 0, [], []
        written_before = self.writer.written
        index = {name: k for k, name in enumerate(self.class_names)}

        def samples():
            nonlocal skipped
            for sample in unit_samples(unit, index, self.done):
                if isinstance(sample, str):
                    seen.append(sample)
                    skipped += 1
                    continue
                seen.append(sample.key)
                yield sample

        def fail(item: Failure) -> None:
            failures.append(item.line())
            self.metrics.failures.labels(self.name, item.reason.split(" (")[0][:40]).inc()

        try:
            for item in self.labeller.label(samples(), self.pool, self._on_batch):
                self.writer.submit(item)
                if isinstance(item, Failure):
                    fail(item)
                    continue
                self.metrics.images.labels(self.name).inc()
                self.bar.update(1)
                if len(shown) < previews:
                    mode = self.cfg.modes[-1]
                    title = f"{item.sample.key} [{mode}] tags: {', '.join(self.class_names[k] for k in item.sample.labels) or '-'}"
                    shown.append((item.sample.key, png_bytes(overlay(item.pixels, item.masks[mode], self.class_names, title))))
                for lost in self.writer.collect():
                    fail(lost)
        except (OSError, ValueError) as exc:
            fail(Failure("", "", unit.uri, f"unit {unit.index} could not be read ({type(exc).__name__}: {exc})"))
        for lost in self.writer.close():
            fail(lost)
        seconds = time.monotonic() - start
        written = self.writer.written - written_before
        return {"unit": unit.index, "seen": seen, "written": written, "skipped": skipped, "failures": failures,
                "previews": shown, "seconds": seconds}
