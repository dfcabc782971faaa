"""The job's outputs: masks, stats and failure lines, the final pass over unit records, the evaluation.

Masks are written through the job's ``MaskCodec`` (``system.masks``), which embeds each image's
stats line in the mask file itself, so a mask and its stats can never disagree and a re-run never
has to recompute a mask to get its statistics. Stats lines are also written in parts per actor (one
small object per image would cost a request each). When the input has GT masks the line holds the
image's confusion counts (sparse); with ``mode=both`` it holds the per-class agreement of the two
masks. Each finished unit sums its lines into its record (``system.label.records``); the final
pass sums the records, so the job's mIoU and quality report are exact after any number of restarts
and cost O(units), with no listing of masks/ and no second pass over images.

Layout under ``output``::

    masks/<key><suffix>             (cam_masks/<key><suffix> too when mode=both; .png by default)
    units/<unit>.<fingerprint>.json, .images.jsonl, .open (system.label.records)
    stats/part-<run>-<writer>-<n>.jsonl
    failures/part-<run>-<writer>-<n>.jsonl
    previews/<key>.png, previews/contact_sheet.png
    quality.json, label_job.json    (last)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Executor, Future, wait

import numpy as np
import torch

from system import storage
from system.label.config import LabelConfig
from system.label.infer import Labelled
from system.label.records import UnitRef, list_units, quality_report, sum_records_parallel
from system.masks import PalettePng
from system.metrics import ConfusionMatrix
from system.refine import IGNORE_INDEX
from system.rejects import Reject

STATS_DIR = "stats"
FAILURES_DIR = "failures"
PREVIEWS_DIR = "previews"
JOB_FILE = "label_job.json"


def read_job(job_uri: str) -> dict:
    """A finished labelling job's record; FileNotFoundError naming ``job=`` when there is none."""
    try:
        return json.loads(storage.get_bytes(storage.join(job_uri.rstrip("/"), JOB_FILE)))
    except FileNotFoundError:
        raise FileNotFoundError(f"job={job_uri}: no {JOB_FILE} (not a labelling job, or it has not finished)") from None


def mask_stats(mask: np.ndarray, class_names: list[str]) -> dict:
    """Classes present and the fraction of pixels per value (background, class names, ignore)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    total = mask.size
    names = {0: "background", IGNORE_INDEX: "ignore", **{k + 1: n for k, n in enumerate(class_names)}}
    fractions = {names.get(int(v), str(int(v))): round(float(counts[v]) / total, 6) for v in np.flatnonzero(counts)}
    classes = [class_names[v - 1] for v in np.flatnonzero(counts) if 0 < v <= len(class_names)]
    return {"classes": classes, "fractions": fractions}


def mask_agreement(cam: np.ndarray, seg: np.ndarray, names: list[str]) -> dict[str, list[int]]:
    """Per value, [intersection, union] pixels of the two masks where the CAM mask decided (not ignore)."""
    valid = cam != IGNORE_INDEX
    joint = np.bincount(seg[valid].astype(np.int64) * 256 + cam[valid], minlength=256 * 256).reshape(256, 256)
    inter = np.diag(joint)
    union = joint.sum(0) + joint.sum(1) - inter
    return {names[v]: [int(inter[v]), int(union[v])] for v in np.flatnonzero(union) if v < len(names)}


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


@dataclasses.dataclass(frozen=True)
class WriteContext:
    """What writing a mask needs besides the mask: plain data, sent once per write to a host worker."""

    cfg: LabelConfig
    class_names: tuple[str, ...]
    run_id: str
    model_id: str


_NO_PIXELS = np.zeros((0, 0, 3), np.uint8)


def mask_line(ctx: WriteContext, item: Labelled) -> dict:
    """The image's stats line (embedded in its mask, written in the stats parts, summed in its unit's record)."""
    cfg, class_names = ctx.cfg, list(ctx.class_names)
    s = item.sample
    primary = cfg.modes[-1]
    H, W = item.masks[primary].shape[:2]
    line = {
        "key": s.key,
        "id": s.id,
        "model": ctx.model_id,
        "run": ctx.run_id,
        "mode": primary,
        "width": W,
        "height": H,
        "model_size": list(item.model_size)[::-1],
        "tags": [class_names[k] for k in s.labels],
        "source": s.source,
    }
    names = ["background", *class_names]
    for mode in cfg.modes:
        part = {**mask_stats(item.masks[mode], class_names), "confidence": _round(item.confidence[mode])}
        part["class_confidence"] = {
            names[v]: _round(c) for v, c in item.class_confidence.get(mode, {}).items() if v < len(names)
        }
        if item.gt is not None:
            part["confusion"] = sparse_confusion(item.gt, item.masks[mode], len(class_names) + 1)
        if mode == primary:
            line.update(part)
        else:
            line[mode] = part
    if len(cfg.modes) > 1:
        line["agreement"] = mask_agreement(item.masks[cfg.modes[0]], item.masks[primary], names)
    return line


def store_masks(ctx: WriteContext, item: Labelled) -> dict:
    """Encode and upload the image's masks; returns its stats line once the last (primary) one is stored."""
    cfg = ctx.cfg
    line = mask_line(ctx, item)
    for mode in cfg.modes:  # the primary mask (masks/) goes last: it marks the image done
        data = cfg.codec.encode(item.masks[mode], line if mode == cfg.modes[-1] else None)
        storage.put_bytes(storage.join(cfg.output, cfg.mask_dir(mode), item.sample.key + cfg.codec.suffix), data)
    return line


class OutputWriter:
    """Writes one actor's masks from its host pool and its stats/failure lines in parts.

    The encode and upload of a mask is ``store_masks``, a module function of plain data, so it runs in
    a host worker process (``system.label.hostpool``) as well as in a thread; the image's pixels stay
    here. At most ``max_pending`` writes are in flight: ``submit`` waits for the oldest beyond that,
    so a model faster than the encoders holds a window of images, not a unit's worth.

    A stats line is only buffered once its mask is stored, and a part is only written after its
    masks, so a line always refers to an existing mask. A write that fails for a transient reason
    (the object store unreachable) is not a failure of the image: ``collect`` raises it so the unit
    is retried, and ``stored`` tells the retry which keys of the unit are already done.
    """

    def __init__(
        self,
        cfg: LabelConfig,
        class_names: list[str],
        run_id: str,
        writer_id: str,
        model_id: str,
        pool: Executor,
        max_pending: int | None = None,
    ):
        self.cfg = cfg
        self.context = WriteContext(cfg, tuple(class_names), run_id, model_id)
        self.max_pending = max_pending or 4 * cfg.batch_size
        self.class_names = class_names
        self.run_id = run_id
        self.writer_id = writer_id
        self.model_id = model_id
        self.pool = pool
        self.pending: deque[tuple[Labelled, Future]] = deque()
        self.lines: list[dict] = []
        self.failures: list[dict] = []
        self.stored: set[str] = set()
        self.unit_lines: list[dict] = []  # the current unit's lines and failed keys, for its record
        self.unit_failed: list[str] = []
        self.seq = 0
        self.written = 0

    def line(self, item: Labelled) -> dict:
        return mask_line(self.context, item)

    def begin_unit(self) -> None:
        self.stored, self.unit_lines, self.unit_failed = set(), [], []

    def submit(self, item: Labelled | Reject) -> None:
        if isinstance(item, Reject):
            self.failures.append(item.line(run=self.run_id))
            if item.key:
                self.unit_failed.append(item.key)
            return
        if len(self.pending) >= self.max_pending:
            wait([self.pending[0][1]])
        # the pixels stay in this process: the line takes the image's size from its masks
        slim = dataclasses.replace(item, pixels=_NO_PIXELS, sample=dataclasses.replace(item.sample, image=None))
        self.pending.append((item, self.pool.submit(store_masks, self.context, slim)))

    def collect(self, wait: bool = False) -> list[Reject]:
        """Move stored masks' lines into the buffer; returns images whose write failed for good, and
        raises the first transient write error once every finished write is accounted for."""
        failed, transient = [], None
        while self.pending and (wait or self.pending[0][1].done()):
            item, future = self.pending.popleft()
            try:
                line = future.result()
                self.lines.append(line)
                self.unit_lines.append(line)
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
                self.unit_failed.append(item.sample.key)
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


@dataclasses.dataclass(frozen=True)
class PlannedUnit:
    """A unit of the plan as the final pass sees it: its record's name and how many images it holds."""

    ref: UnitRef
    images: int | None  # None: unknown (the unit's samples are only known once read)


def finalize_outputs(cfg: LabelConfig, class_names: list[str], planned: list[PlannedUnit]) -> dict:
    """The final pass: sum the records of the plan's units (never a listing of masks/ or a stats part).

    A unit without its record is not done; a record whose outcomes cover fewer keys than the unit
    holds reports the rest missing. The evaluation is the records' confusion sums, exact after any
    number of restarts.
    """
    start = time.monotonic()
    listing = list_units(cfg.output)
    done = [p for p in planned if listing.done(p.ref)]
    names = ["background", *class_names]
    totals = sum_records_parallel([p.ref.record(cfg.output) for p in done], cfg.modes, len(names))
    undone = [p for p in planned if not listing.done(p.ref)]
    expected = sum(p.images or 0 for p in done)
    evaluation = {}
    for mode in cfg.modes:
        if totals.gt_images[mode]:
            cm = ConfusionMatrix.from_state(torch.from_numpy(totals.confusion[mode]))
            evaluation[mode] = {**cm.summary(names), "images": totals.gt_images[mode]}
    masks = totals.written + totals.skipped
    return {
        "totals": totals,
        "units_done": len(done),
        "units_undone": [p.ref.name for p in undone[:1000]],
        "images_undone": sum(p.images or 0 for p in undone),
        "masks": masks,
        "stats_lines": totals.images[cfg.modes[-1]],
        "stats_recovered": totals.recovered,
        "masks_without_stats": masks - totals.images[cfg.modes[-1]],
        "missing": max(0, expected - masks - totals.failed) if all(p.images is not None for p in done) else 0,
        "missing_keys": [],
        "eval": evaluation,
        "quality": quality_report(totals, class_names, cfg.modes),
        "seconds": round(time.monotonic() - start, 3),
    }
