"""Prometheus metrics, progress lines and the one logging set-up shared by every job.

Metric names follow one pattern: ``clustercam_<what>_<unit>``. Each process (a training worker, a
labelling actor, the ingest or labelling driver) exposes its own registry on its own port, on
loopback unless told otherwise. Ports are keyed by what is local to a node (a worker's local rank,
an actor's slot on its node), so a pod declares a fixed, small set of ports whatever the job's size.

Every series carries ``run`` (the training run's name, the labelling run's id, the ingested
dataset's name), so one Prometheus serves many runs and a dashboard picks one; the other labels
are bounded codes (``rank``, ``actor``, a loss ``term``, a rejection's ``code``), never free text.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def setup_logging() -> None:
    """The one log format of every entry point and Ray worker: time, logger, message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> int:
    """Serve this process's metrics at ``http://addr:port/metrics``; returns the port bound."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server.server_port


def start_metrics_server_in_range(first: int, count: int, addr: str = "127.0.0.1") -> int | None:
    """Serve on the first free port of ``first .. first + count - 1``: processes that share a node
    and have no local rank of their own (labelling actors) take one slot each of a range the pod
    declares. None (and a warning) when every slot is taken: metrics must never stop the work."""
    for port in range(first, first + count):
        try:
            return start_metrics_server(port, addr)
        except OSError:
            continue
    log.warning("no free metrics port in %d-%d on %s: this process is not scraped", first, first + count - 1, addr)
    return None


@dataclasses.dataclass(frozen=True)
class TrainMetrics:
    samples: Counter
    steps: Counter
    step_seconds: Histogram
    data_wait_seconds: Histogram
    samples_per_second: Gauge
    loss: Gauge
    learning_rate: Gauge
    memory_bytes: Gauge
    epoch: Gauge


@lru_cache(maxsize=1)
def train_metrics() -> TrainMetrics:
    r = REGISTRY
    return TrainMetrics(
        samples=Counter("clustercam_train_samples", "training samples consumed", ["run", "rank"], registry=r),
        steps=Counter("clustercam_train_steps", "optimizer steps taken", ["run", "rank"], registry=r),
        step_seconds=Histogram(
            "clustercam_train_step_seconds", "wall time of one step", ["run", "rank"], buckets=_STEP_BUCKETS, registry=r
        ),
        data_wait_seconds=Histogram(
            "clustercam_data_wait_seconds",
            "time a step waited for its batch",
            ["run", "rank"],
            buckets=_STEP_BUCKETS,
            registry=r,
        ),
        samples_per_second=Gauge(
            "clustercam_train_samples_per_second", "recent training throughput", ["run", "rank"], registry=r
        ),
        loss=Gauge(
            "clustercam_train_loss", "last loss by term (total, cls, pat, seg)", ["run", "rank", "term"], registry=r
        ),
        learning_rate=Gauge("clustercam_train_learning_rate", "current learning rate", ["run", "rank"], registry=r),
        memory_bytes=Gauge(
            "clustercam_train_memory_bytes",
            "peak accelerator memory (resident set on CPU)",
            ["run", "rank"],
            registry=r,
        ),
        epoch=Gauge("clustercam_train_epoch", "current epoch", ["run", "rank"], registry=r),
    )


@dataclasses.dataclass(frozen=True)
class LabelMetrics:
    images: Counter
    failures: Counter
    batch_seconds: Histogram
    images_per_second: Gauge
    queue_depth: Gauge
    input_images: Gauge
    done_images: Counter


@lru_cache(maxsize=1)
def label_metrics() -> LabelMetrics:
    r = REGISTRY
    return LabelMetrics(
        images=Counter("clustercam_label_images", "images labelled (masks written)", ["run", "actor"], registry=r),
        failures=Counter(
            "clustercam_label_failures",
            "images that could not be labelled, by rejection code",
            ["run", "actor", "code"],
            registry=r,
        ),
        batch_seconds=Histogram(
            "clustercam_label_batch_seconds",
            "model time per batch",
            ["run", "actor"],
            buckets=_STEP_BUCKETS,
            registry=r,
        ),
        images_per_second=Gauge(
            "clustercam_label_images_per_second", "recent labelling throughput", ["run", "actor"], registry=r
        ),
        queue_depth=Gauge("clustercam_label_queue_depth", "work units waiting for an actor", ["run"], registry=r),
        input_images=Gauge(
            "clustercam_label_input_images", "images the run covers (the total of its progress)", ["run"], registry=r
        ),
        done_images=Counter(
            "clustercam_label_done_images",
            "images finished by the run: mask written, skipped as already labelled, or failed",
            ["run"],
            registry=r,
        ),
    )


@dataclasses.dataclass(frozen=True)
class IngestMetrics:
    samples: Counter
    rejects: Counter
    shards: Counter
    inputs: Gauge
    done_inputs: Counter


@lru_cache(maxsize=1)
def ingest_metrics() -> IngestMetrics:
    r = REGISTRY
    return IngestMetrics(
        samples=Counter("clustercam_ingest_samples", "samples written to shards", ["run"], registry=r),
        rejects=Counter("clustercam_ingest_rejects", "inputs rejected, by rejection code", ["run", "code"], registry=r),
        shards=Counter("clustercam_ingest_shards", "shards completed", ["run"], registry=r),
        inputs=Gauge(
            "clustercam_ingest_inputs", "inputs the ingest covers (the total of its progress)", ["run"], registry=r
        ),
        done_inputs=Counter(
            "clustercam_ingest_done_inputs", "inputs finished (written into a shard or rejected)", ["run"], registry=r
        ),
    )


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts units of work and logs rate and ETA at most every ``every_s`` seconds."""

    def __init__(
        self,
        total: int | None,
        what: str,
        log: Callable[[str], None] = log.info,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        start: int = 0,
    ):
        """``start`` units were done before (a resumed job): they count for progress, not for rate."""
        self.total = total
        self.what = what
        self.done = start
        self._start_done = start
        self._log = log
        self._every = every_s
        self._clock = clock
        self._start = clock()
        self._last = self._start

    @property
    def rate(self) -> float:
        elapsed = self._clock() - self._start
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        if self.total:
            eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
            return f"{self.what}: {self.done}/{self.total} ({100 * self.done / self.total:.1f}%) {rate:.2f}/s ETA {eta}"
        return f"{self.what}: {self.done} {rate:.2f}/s"

    def update(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = self._clock()
        if force or now - self._last >= self._every or (self.total is not None and self.done >= self.total):
            self._last = now
            self._log(self.line())
