"""The job's outputs: masks, stats and failure lines, the final consistency pass and the evaluation.

Masks are written through the job's ``MaskCodec`` (``system.masks``), which embeds each image's
stats line in the mask file itself. Stats lines are buffered and written in
parts (one small object per image would cost a request each), so a killed job leaves masks whose
lines were never flushed; the final pass finds them with the one listing it makes anyway and reads
their line back from the mask file. A mask and its stats can therefore never disagree, and a re-run never
has to recompute a mask to get its statistics. When the input has GT masks the line also holds the
image's confusion counts (sparse), so the job's mIoU is the sum over lines, exact after any number
of restarts, with no second pass over images.

Layout under ``output``::

    masks/<key><suffix>             (cam_masks/<key><suffix> too when mode=both; .png by default)
    stats/part-<run>-<writer>-<n>.jsonl
    failures/part-<run>-<writer>-<n>.jsonl
    previews/<key>.png, previews/contact_sheet.png
    label_job.json                  (last)
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numpy as np
import torch

from system import storage
from system.label.config import LabelConfig
from system.label.infer import Labelled
from system.masks import PalettePng
from system.metrics import ConfusionMatrix
from system.refine import IGNORE_INDEX
from system.rejects import Reject

STATS_DIR = "stats"
FAILURES_DIR = "failures"
PREVIEWS_DIR = "previews"
JOB_FILE = "label_job.json"


def mask_stats(mask: np.ndarray, class_names: list[str]) -> dict:
    """Classes present and the fraction of pixels per value (background, class names, ignore)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    total = mask.size
    names = {0: "background", IGNORE_INDEX: "ignore", **{k + 1: n for k, n in enumerate(class_names)}}
    fractions = {names.get(int(v), str(int(v))): round(float(counts[v]) / total, 6) for v in np.flatnonzero(counts)}
    classes = [class_names[v - 1] for v in np.flatnonzero(counts) if 0 < v <= len(class_names)]
    return {"classes": classes, "fractions": fractions}


def sparse_confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> list[list[int]]:
    """Non-zero cells of the image's (n, n+1) confusion state; column n counts predictions outside 0..n-1."""
    state = ConfusionMatrix(n).add(gt, pred).state().numpy()
    rows, cols = np.nonzero(state)
    return [[int(r), int(c), int(state[r, c])] for r, c in zip(rows, cols)]


def confusion_from_sparse(images: Iterable[list[list[int]]], n: int) -> ConfusionMatrix:
    """The summed confusion matrix of many images' ``sparse_confusion`` counts."""
    state = torch.zeros(n, n + 1, dtype=torch.float64)
    for cells in images:
        for r, c, count in cells:
            state[r, c] += count
    return ConfusionMatrix.from_state(state)


def _part_name(run_id: str, writer_id: str, seq: int) -> str:
    return f"part-{run_id}-{writer_id}-{seq:05d}.jsonl"


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


class OutputWriter:
    """Writes one actor's masks from a thread pool and its stats/failure lines in parts.

    A stats line is only buffered once its mask is stored, and a part is only written after its
    masks, so a line always refers to an existing mask. A write that fails for a transient reason
    (the object store unreachable) is not a failure of the image: ``collect`` raises it so the unit
    is retried, and ``stored`` tells the retry which keys of the unit are already done.
    """

    def __init__(
        self, cfg: LabelConfig, class_names: list[str], run_id: str, writer_id: str, model_id: str, pool: Executor
    ):
        self.cfg = cfg
        self.class_names = class_names
        self.run_id = run_id
        self.writer_id = writer_id
        self.model_id = model_id
        self.pool = pool
        self.pending: deque[tuple[Labelled, Future]] = deque()
        self.lines: list[dict] = []
        self.failures: list[dict] = []
        self.stored: set[str] = set()
        self.seq = 0
        self.written = 0

    def line(self, item: Labelled) -> dict:
        s = item.sample
        H, W = item.pixels.shape[:2]
        primary = self.cfg.modes[-1]
        line = {
            "key": s.key,
            "id": s.id,
            "model": self.model_id,
            "run": self.run_id,
            "mode": primary,
            "width": W,
            "height": H,
            "model_size": list(item.model_size)[::-1],
            "tags": [self.class_names[k] for k in s.labels],
            "source": s.source,
        }
        for mode in self.cfg.modes:
            part = {**mask_stats(item.masks[mode], self.class_names), "confidence": _round(item.confidence[mode])}
            if item.gt is not None:
                part["confusion"] = sparse_confusion(item.gt, item.masks[mode], len(self.class_names) + 1)
            if mode == primary:
                line.update(part)
            else:
                line[mode] = part
        return line

    def _store(self, item: Labelled) -> dict:
        line = self.line(item)
        for mode in self.cfg.modes:  # the primary mask (masks/) goes last: it marks the image done
            data = self.cfg.codec.encode(item.masks[mode], line if mode == self.cfg.modes[-1] else None)
            storage.put_bytes(
                storage.join(self.cfg.output, self.cfg.mask_dir(mode), item.sample.key + self.cfg.codec.suffix), data
            )
        return line

    def begin_unit(self) -> None:
        self.stored = set()

    def submit(self, item: Labelled | Reject) -> None:
        if isinstance(item, Reject):
            self.failures.append(item.line(run=self.run_id))
            return
        self.pending.append((item, self.pool.submit(self._store, item)))

    def collect(self, wait: bool = False) -> list[Reject]:
        """Move stored masks' lines into the buffer; returns images whose write failed for good, and
        raises the first transient write error once every finished write is accounted for."""
        failed, transient = [], None
        while self.pending and (wait or self.pending[0][1].done()):
            item, future = self.pending.popleft()
            try:
                self.lines.append(future.result())
                self.written += 1
                self.stored.add(item.sample.key)
            except Exception as exc:  # botocore's connection errors are neither OSError nor StorageError
                if storage.is_transient(exc):
                    transient = transient or exc
                    continue
                if not isinstance(exc, (OSError, storage.StorageError)):
                    raise
                failure = item.sample.reject("write_failed", f"writing the mask failed ({exc})")
                self.failures.append(failure.line(run=self.run_id))
                failed.append(failure)
        if transient is not None:
            raise transient
        if len(self.lines) + len(self.failures) >= self.cfg.flush_every:
            self.flush()
        return failed

    def settle(self) -> None:
        """Wait for every write in flight after a unit was interrupted, keeping what was stored; the
        transient errors are dropped (their keys are redone), any other is raised."""
        while self.pending:
            try:
                self.collect(wait=True)
            except Exception as exc:
                if not storage.is_transient(exc):
                    raise

    def flush(self) -> None:
        for folder, lines in ((STATS_DIR, self.lines), (FAILURES_DIR, self.failures)):
            if lines:
                storage.put_bytes(
                    storage.join(self.cfg.output, folder, _part_name(self.run_id, self.writer_id, self.seq)),
                    _jsonl(lines),
                )
        if self.lines or self.failures:
            self.seq += 1
        self.lines, self.failures = [], []

    def close(self) -> list[Reject]:
        failed = self.collect(wait=True)
        self.flush()
        return failed


def _round(value: float) -> float | None:
    return None if value != value else round(value, 5)


def list_mask_keys(folder: str, suffix: str = PalettePng.suffix) -> set[str]:
    """Keys of the ``<key><suffix>`` files directly in ``folder`` (one paginated listing)."""
    prefix = folder.rstrip("/") + "/"
    return {
        uri[len(prefix) : -len(suffix)]
        for uri in storage.list_uris(folder)
        if uri.endswith(suffix) and "/" not in uri[len(prefix) :]
    }


def _read_lines(output: str, folder: str, pool: Executor) -> Iterator[dict]:
    """Every line of every part below ``folder``, parts fetched in parallel a window at a time."""
    uris = [u for u in storage.list_uris(storage.join(output, folder)) if u.endswith(".jsonl")]
    for text in pool.map(storage.get_bytes, uris):
        for raw in text.decode("utf-8").splitlines():
            if raw.strip():
                yield json.loads(raw)


def finalize_outputs(cfg: LabelConfig, run_id: str, class_names: list[str], seen: set[str], failed: set[str]) -> dict:
    """The consistency pass: one listing of masks/, every stats part read, lost lines recovered, eval summed.

    Only each key's run and confusion counts are kept (a line is ~1 kB; a corpus has millions). A key
    with two lines (a unit retried after its actor died, or ``overwrite``) counts once, preferring
    this run's line. ``seen`` are the input keys the actors met this run (labelled, skipped or
    failed); a seen key with neither a mask nor a failure this run is reported missing.
    """
    start = time.monotonic()
    primary = cfg.modes[-1]  # its fields are the line's own; the other mode's are nested under its name
    kept: dict[str, tuple[str | None, dict[str, list]]] = {}

    def keep(line: dict) -> None:
        key = line["key"]
        if key in masks and (key not in kept or line.get("run") == run_id):
            kept[key] = (
                line.get("run"),
                {m: (line if m == primary else line.get(m, {})).get("confusion") for m in cfg.modes},
            )

    with ThreadPoolExecutor(16) as pool:
        codec = cfg.codec
        masks = list_mask_keys(storage.join(cfg.output, "masks"), codec.suffix)
        for line in _read_lines(cfg.output, STATS_DIR, pool):
            keep(line)
        lost = sorted(masks - set(kept))
        recovered = [
            line
            for line in pool.map(
                lambda k: codec.read_line(storage.get_bytes(storage.join(cfg.output, "masks", k + codec.suffix))), lost
            )
            if line
        ]
    if recovered:
        storage.put_bytes(storage.join(cfg.output, STATS_DIR, _part_name(run_id, "recovered", 0)), _jsonl(recovered))
        for line in recovered:
            keep(line)
    names = ["background", *class_names]
    evaluation = {}
    for mode in cfg.modes:
        confusions = [c[mode] for _, c in kept.values() if c[mode]]
        if confusions:
            evaluation[mode] = {
                **confusion_from_sparse(confusions, len(names)).summary(names),
                "images": len(confusions),
            }
    missing = sorted(seen - masks - failed)
    return {
        "masks": len(masks),
        "stats_lines": len(kept),
        "stats_recovered": len(recovered),
        "masks_without_stats": len(masks) - len(kept),
        "missing": len(missing),
        "missing_keys": missing[:1000],
        "eval": evaluation,
        "seconds": round(time.monotonic() - start, 3),
    }
