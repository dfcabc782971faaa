"""The job's outputs: masks, stats and failure lines, the final consistency pass and the evaluation.

Each mask PNG carries its own stats line in a ``tEXt`` chunk. Stats lines are buffered and written in
parts (one small object per image would cost a request each), so a killed job leaves masks whose
lines were never flushed; the final pass finds them with the one listing it makes anyway and reads
their line back from the PNG. A mask and its stats can therefore never disagree, and a re-run never
has to recompute a mask to get its statistics. When the input has GT masks the line also holds the
image's confusion counts (sparse), so the job's mIoU is the sum over lines, exact after any number
of restarts, with no second pass over images.

Layout under ``output``::

    masks/<key>.png                 (cam_masks/<key>.png too when mode=both)
    stats/part-<run>-<writer>-<n>.jsonl
    failures/part-<run>-<writer>-<n>.jsonl
    previews/<key>.png, previews/contact_sheet.png
    label_job.json                  (last)

Public API::

    mask_png(mask, line) -> bytes;  mask_line(png) -> dict | None
    mask_stats(mask, class_names) -> {"classes", "fractions"}
    sparse_confusion(gt, pred, n) -> [[gt, pred_or_n, count], ...];  confusion_from_lines(lines, n, path)
    OutputWriter(cfg, class_names, run_id, writer_id, model_id, pool)
    list_mask_keys(folder) -> set[str]
    finalize_outputs(cfg, run_id, class_names, seen, failed) -> dict
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from system import storage
from system.label.config import LabelConfig
from system.label.infer import Failure, Labelled
from system.masks import encode_mask
from system.metrics import ConfusionMatrix
from system.refine import IGNORE_INDEX

TEXT_KEY = "clustercam"
STATS_DIR = "stats"
FAILURES_DIR = "failures"
PREVIEWS_DIR = "previews"
JOB_FILE = "label_job.json"
_IHDR_END = 8 + 4 + 4 + 13 + 4  # signature + IHDR chunk (length, type, 13 data bytes, crc)


def mask_png(mask: np.ndarray, line: dict | None = None) -> bytes:
    """The palette PNG of ``system.masks`` with ``line`` (JSON) in a tEXt chunk right after IHDR."""
    png = encode_mask(mask)
    if line is None:
        return png
    data = TEXT_KEY.encode("latin-1") + b"\0" + json.dumps(line, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:_IHDR_END] + chunk + png[_IHDR_END:]


def mask_line(png: bytes) -> dict | None:
    with Image.open(io.BytesIO(png)) as image:
        text = image.text.get(TEXT_KEY)
    return json.loads(text) if text else None


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


def confusion_from_lines(lines: Iterable[dict], n: int, mode_path: tuple[str, ...] = ()) -> ConfusionMatrix | None:
    """The summed confusion matrix of every line with GT (``mode_path`` selects a nested output)."""
    state = torch.zeros(n, n + 1, dtype=torch.float64)
    found = False
    for line in lines:
        for r, c, count in _nested(line, mode_path).get("confusion") or ():
            state[r, c] += count
            found = True
    return ConfusionMatrix.from_state(state) if found else None


def _part_name(run_id: str, writer_id: str, seq: int) -> str:
    return f"part-{run_id}-{writer_id}-{seq:05d}.jsonl"


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


class OutputWriter:
    """Writes one actor's masks from a thread pool and its stats/failure lines in parts.

    A stats line is only buffered once its mask is stored, and a part is only written after its
    masks, so a line always refers to an existing mask.
    """

    def __init__(self, cfg: LabelConfig, class_names: list[str], run_id: str, writer_id: str, model_id: str, pool: Executor):
        self.cfg = cfg
        self.class_names = class_names
        self.run_id = run_id
        self.writer_id = writer_id
        self.model_id = model_id
        self.pool = pool
        self.pending: deque[tuple[Labelled, Future]] = deque()
        self.lines: list[dict] = []
        self.failures: list[dict] = []
        self.seq = 0
        self.written = 0

    def line(self, item: Labelled) -> dict:
        s = item.sample
        H, W = item.pixels.shape[:2]
        primary = self.cfg.modes[-1]
        line = {"key": s.key, "id": s.id, "model": self.model_id, "run": self.run_id, "mode": primary,
                "width": W, "height": H, "model_size": list(item.model_size)[::-1],
                "tags": [self.class_names[k] for k in s.labels], "source": s.source}
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
            png = mask_png(item.masks[mode], line if mode == self.cfg.modes[-1] else None)
            storage.put_bytes(storage.join(self.cfg.output, self.cfg.mask_dir(mode), f"{item.sample.key}.png"), png)
        return line

    def submit(self, item: Labelled | Failure) -> None:
        if isinstance(item, Failure):
            self.failures.append({**item.line(), "run": self.run_id})
            return
        self.pending.append((item, self.pool.submit(self._store, item)))

    def collect(self, wait: bool = False) -> list[Failure]:
        """Move stored masks' lines into the buffer; returns images whose write failed."""
        failed = []
        while self.pending and (wait or self.pending[0][1].done()):
            item, future = self.pending.popleft()
            try:
                self.lines.append(future.result())
                self.written += 1
            except (OSError, storage.StorageError) as exc:
                s = item.sample
                failure = Failure(s.key, s.id, s.source, f"writing the mask failed ({exc})")
                self.failures.append({**failure.line(), "run": self.run_id})
                failed.append(failure)
        if len(self.lines) + len(self.failures) >= self.cfg.flush_every:
            self.flush()
        return failed

    def flush(self) -> None:
        for folder, lines in ((STATS_DIR, self.lines), (FAILURES_DIR, self.failures)):
            if lines:
                storage.put_bytes(storage.join(self.cfg.output, folder, _part_name(self.run_id, self.writer_id, self.seq)), _jsonl(lines))
        if self.lines or self.failures:
            self.seq += 1
        self.lines, self.failures = [], []

    def close(self) -> list[Failure]:
        failed = self.collect(wait=True)
        self.flush()
        return failed


def _round(value: float) -> float | None:
    return None if value != value else round(value, 5)


def list_mask_keys(folder: str) -> set[str]:
    """Keys of the ``<key>.png`` files directly in ``folder`` (one paginated listing)."""
    prefix = folder.rstrip("/") + "/"
    return {uri[len(prefix) : -4] for uri in storage.list_uris(folder) if uri.endswith(".png") and "/" not in uri[len(prefix) :]}


def _read_parts(output: str, folder: str, pool: Executor) -> list[tuple[str, list[dict]]]:
    uris = [u for u in storage.list_uris(storage.join(output, folder)) if u.endswith(".jsonl")]
    texts = pool.map(storage.get_bytes, uris)
    return [(uri, [json.loads(line) for line in text.decode("utf-8").splitlines() if line.strip()]) for uri, text in zip(uris, texts)]


def finalize_outputs(cfg: LabelConfig, run_id: str, class_names: list[str], seen: set[str], failed: set[str]) -> dict:
    """The consistency pass: one listing of masks/, every stats part read, lost lines recovered, eval summed.

    ``seen`` are the input keys the actors met this run (labelled, skipped or failed); a seen key with
    neither a mask nor a failure this run is reported missing.
    """
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        masks = list_mask_keys(storage.join(cfg.output, "masks"))
        lines: dict[str, dict] = {}
        for _uri, part in _read_parts(cfg.output, STATS_DIR, pool):
            for line in part:
                if line["key"] in masks and (line["key"] not in lines or line.get("run") == run_id):
                    lines[line["key"]] = line
        lost = sorted(masks - set(lines))
        recovered = [line for line in pool.map(lambda k: mask_line(storage.get_bytes(storage.join(cfg.output, "masks", f"{k}.png"))), lost) if line]
        if recovered:
            storage.put_bytes(storage.join(cfg.output, STATS_DIR, _part_name(run_id, "recovered", 0)), _jsonl(recovered))
            lines.update({line["key"]: line for line in recovered})
    n = len(class_names) + 1
    names = ["background", *class_names]
    evaluation = {}
    for mode in cfg.modes:
        path = () if mode == cfg.modes[-1] else (mode,)
        cm = confusion_from_lines(lines.values(), n, path)
        if cm is not None:
            evaluation[mode] = {**cm.summary(names), "images": sum(1 for line in lines.values() if _nested(line, path).get("confusion"))}
    missing = sorted(seen - masks - failed)
    return {
        "masks": len(masks),
        "stats_lines": len(lines),
        "stats_recovered": len(recovered),
        "masks_without_stats": len(masks) - len(lines),
        "missing": len(missing),
        "missing_keys": missing[:1000],
        "eval": evaluation,
        "seconds": round(time.monotonic() - start, 3),
    }


def _nested(line: dict, path: tuple[str, ...]) -> dict:
    for part in path:
        line = line.get(part, {})
    return line
