"""The masks worth trusting: a manifest of a finished labelling job's masks that pass quality thresholds.

    python -m pipelines.select job=s3://b/labels/voc-train min_confidence=0.6 min_agreement=0.5 min_area=0.01 \\
        [output=s3://b/labels/voc-train/selected.jsonl]

Reads the job's unit records and streams their per-image rows (``units/*.images.jsonl``, written
by the actors; see ``system.label.records``) a few files at a time, so memory stays flat however
many images the job has. Each selected row is a manifest line ``{"id", "labels", "mask", ...}``
with ``image`` when the job read a manifest (its image location) and ``shard`` when it read a
dataset, plus the values it was selected on, for training a fully supervised segmenter on the
trustworthy part. Thresholds: the image's mean confidence (primary mode), the seg/CAM agreement
(mean IoU, ``mode=both`` jobs only) and the smallest area fraction any tagged class covers (a tag
absent from the mask has area 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pipelines.entry import BadInput, run_main
from system import storage
from system.config import option, parse_cli
from system.label.outputs import read_job
from system.label.records import UNITS_DIR
from system.masks import mask_codec
from system.telemetry import setup_logging

log = logging.getLogger("pipelines.select")
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass
class SelectConfig:
    """Select a labelling job's masks by confidence, agreement and area into a manifest."""

    job: str = option(doc="the labelling job's output folder or s3:// prefix (with label_job.json and units/)")
    output: str = option("", doc="manifest to write (.jsonl); empty: <job>/selected.jsonl")
    min_confidence: float = option(0.0, doc="lowest mean confidence of the image's primary mask")
    min_agreement: float = option(0.0, doc="lowest seg/CAM agreement (mean IoU); needs a mode=both job")
    min_area: float = option(0.0, doc="lowest area fraction of every tagged class (0: no area check)")
    threads: int = option(8, doc="per-unit files fetched at once")

    def __post_init__(self) -> None:
        if not self.job:
            raise ValueError("job must not be empty")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


@dataclasses.dataclass
class Selection:
    images: int
    selected: int
    output: str


def windowed_map(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor, window: int) -> Iterator[R]:
    """``pool.map`` holding at most ``window`` results in flight, in order."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def current_records(job: str) -> list[str]:
    """The images files of the job's records, one per unit (the newest run's when an input changed)."""
    prefix = storage.join(job, UNITS_DIR) + "/"
    by_unit: dict[str, list[str]] = {}
    for uri in storage.list_uris(storage.join(job, UNITS_DIR)):
        name = uri[len(prefix) :]
        if name.endswith(".json"):
            by_unit.setdefault(name[: -len(".json")].rpartition(".")[0], []).append(uri)
    out = []
    for unit in sorted(by_unit):
        uris = by_unit[unit]
        if len(uris) > 1:
            uris = [max(uris, key=lambda u: json.loads(storage.get_bytes(u))["run"])]
        out.append(uris[0][: -len(".json")] + ".images.jsonl")
    return out


def passes(row: dict, cfg: SelectConfig) -> bool:
    if cfg.min_confidence and (row.get("confidence") is None or row["confidence"] < cfg.min_confidence):
        return False
    if cfg.min_agreement and (row.get("agreement") is None or row["agreement"] < cfg.min_agreement):
        return False
    if cfg.min_area and any(row["area"].get(tag, 0.0) < cfg.min_area for tag in row["tags"]):
        return False
    return True


def select(cfg: SelectConfig) -> Selection:
    job_uri = cfg.job.rstrip("/")
    try:
        job = read_job(cfg.job)
    except FileNotFoundError as exc:
        raise BadInput(str(exc)) from None
    mode, suffix = job["config"]["mode"], mask_codec(job["config"].get("mask_format", "png")).suffix
    if cfg.min_agreement and mode != "both":
        raise BadInput(f"min_agreement needs a mode=both job; {cfg.job} ran mode={mode}")
    manifest = job["dataset"]["kind"] == "manifest"
    output = cfg.output or storage.join(job_uri, "selected.jsonl")
    images = selected = 0
    with ThreadPoolExecutor(cfg.threads) as pool, storage.open_write(output) as out:
        for data in windowed_map(storage.get_bytes, current_records(job_uri), pool, cfg.threads):
            for raw in data.decode("utf-8").splitlines():
                row = json.loads(raw)
                images += 1
                if not passes(row, cfg):
                    continue
                selected += 1
                line = {
                    "id": row["id"],
                    "labels": row["tags"],
                    "mask": storage.join(job_uri, "masks", row["key"] + suffix),
                    ("image" if manifest else "shard"): row["source"],
                    "confidence": row["confidence"],
                    **({"agreement": row["agreement"]} if "agreement" in row else {}),
                }
                out.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
    log.info("select: %d of %d masks pass -> %s", selected, images, output)
    return Selection(images, selected, output)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_cli(SelectConfig, argv, prog="python -m pipelines.select")
    run_main("select", lambda: print(json.dumps(dataclasses.asdict(select(cfg)))))


if __name__ == "__main__":
    main()
