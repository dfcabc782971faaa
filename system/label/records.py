"""Unit completion records: what keeps a labelling job's control plane O(work units), not O(images).

Every unit (a shard or a manifest chunk) that an actor finishes ends with two small objects next
to the outputs, written after all of the unit's masks::

    units/<unit>.<fingerprint>.images.jsonl   one row of quality values per mask (for ``select``)
    units/<unit>.<fingerprint>.json           the record: its keys' outcomes, stats and confusion sums

The fingerprint is the unit's input identity (a shard's sha256 from ``dataset.json``, a hash of a
manifest chunk's rows), so an input that changed is never taken for done. A unit an actor started
leaves ``units/<unit>.<fingerprint>.open`` first: a re-run checks the keys of such a unit one by
one (its own masks only), and skips a unit with a record without reading it. The final pass, the quality report
and the evaluation sum the records' arrays; no step holds a per-image collection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from system import storage

UNITS_DIR = "units"
RECORD_FORMAT = "clustercam-label-unit"
# mask area (fraction of the image) histogram edges: fixed, so histograms of units simply add up
AREA_EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
_SUMS = ("tagged", "present", "absent", "area_sum", "conf_sum", "conf_n", "area_hist")


def fingerprint(*parts: object) -> str:
    """16 hex digits identifying a unit's input (part of the record's name)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class UnitRef:
    """A unit's name and input fingerprint: all a re-run needs to know whether it is done."""

    name: str
    fingerprint: str

    def record(self, output: str) -> str:
        return storage.join(output, UNITS_DIR, f"{self.name}.{self.fingerprint}.json")

    def images(self, output: str) -> str:
        return storage.join(output, UNITS_DIR, f"{self.name}.{self.fingerprint}.images.jsonl")

    def marker(self, output: str) -> str:
        return storage.join(output, UNITS_DIR, f"{self.name}.{self.fingerprint}.open")


@dataclasses.dataclass(frozen=True)
class UnitsListing:
    """One listing of ``units/``: the records there and the units started, as (name, fingerprint)."""

    records: frozenset[tuple[str, str]]
    started: frozenset[tuple[str, str]]

    def done(self, ref: UnitRef) -> bool:
        return (ref.name, ref.fingerprint) in self.records

    def was_started(self, ref: UnitRef) -> bool:
        """Started on this very input: its keys' masks are this input's (a changed input starts afresh)."""
        return (ref.name, ref.fingerprint) in self.started


def list_units(output: str) -> UnitsListing:
    prefix = storage.join(output, UNITS_DIR) + "/"
    records, started = set(), set()
    for uri in storage.list_uris(storage.join(output, UNITS_DIR)):
        name = uri[len(prefix) :]
        for suffix, found in ((".open", started), (".json", records)):
            if name.endswith(suffix):
                unit, _, fp = name[: -len(suffix)].rpartition(".")
                found.add((unit, fp))
    return UnitsListing(frozenset(records), frozenset(started))


def _names(class_names: list[str]) -> list[str]:
    return ["background", *class_names]


def image_values(line: dict, modes: tuple[str, ...], class_names: list[str]) -> dict:
    """The per-image quality values ``select`` filters on, from a mask's stats line."""
    primary = modes[-1]
    fractions = line.get("fractions", {})
    tags = line.get("tags", [])
    row = {
        "key": line["key"],
        "id": line.get("id"),
        "source": line.get("source"),
        "tags": tags,
        "confidence": line.get("confidence"),
        "area": {n: fractions[n] for n in class_names if n in fractions},
        "absent": [t for t in tags if not fractions.get(t)],
    }
    if len(modes) > 1:
        row["agreement"] = image_agreement(line.get("agreement", {}))
        row["modes"] = {m: {"confidence": line.get(m, {}).get("confidence")} for m in modes if m != primary}
    row["mode"] = primary
    return row


def image_agreement(cells: dict[str, list[int]]) -> float | None:
    """Mean IoU over the values either mask uses (background included); None without any pixel."""
    ious = [inter / union for inter, union in cells.values() if union]
    return round(sum(ious) / len(ious), 6) if ious else None


@dataclasses.dataclass
class ModeSums:
    """One mode's per-value sums over images (index 0 background, k+1 class k): they add up exactly."""

    images: int
    tagged: np.ndarray  # images tagged with the class
    present: np.ndarray  # images whose mask has the class
    absent: np.ndarray  # images tagged with the class whose mask lacks it
    area_sum: np.ndarray  # sum of the class's area fraction over images with it
    area_hist: np.ndarray  # (values, bins) images by area fraction, AREA_EDGES
    conf_sum: np.ndarray  # sum of the per-image mean confidence of the class's pixels
    conf_n: np.ndarray  # images that contributed to conf_sum
    confusion: dict[tuple[int, int], int]  # sparse (gt, pred) -> pixels, images with GT only
    gt_images: int

    @classmethod
    def zeros(cls, n: int) -> ModeSums:
        def z():
            return np.zeros(n, np.float64)

        return cls(0, z(), z(), z(), z(), np.zeros((n, len(AREA_EDGES) - 1)), z(), z(), {}, 0)

    def add_line(self, part: dict, tags: list[str], names: list[str]) -> None:
        index = {name: v for v, name in enumerate(names)}
        self.images += 1
        for t in tags:
            if t in index:
                self.tagged[index[t]] += 1
                if not part.get("fractions", {}).get(t):
                    self.absent[index[t]] += 1
        for name, frac in part.get("fractions", {}).items():
            v = index.get(name)
            if v is None or not frac:
                continue
            self.present[v] += 1
            self.area_sum[v] += frac
            self.area_hist[v, min(np.searchsorted(AREA_EDGES, frac, side="right") - 1, len(AREA_EDGES) - 2)] += 1
        for name, conf in part.get("class_confidence", {}).items():
            v = index.get(name)
            if v is not None and conf is not None:
                self.conf_sum[v] += conf
                self.conf_n[v] += 1
        if part.get("confusion") is not None:
            self.gt_images += 1
            for r, c, count in part["confusion"]:
                self.confusion[(r, c)] = self.confusion.get((r, c), 0) + count

    def to_json(self) -> dict:
        out = {k: getattr(self, k).tolist() for k in _SUMS}
        cells = sorted(self.confusion.items())
        confusion = [[r, c, n] for (r, c), n in cells]
        return {"images": self.images, "gt_images": self.gt_images, **out, "confusion": confusion}


@dataclasses.dataclass
class UnitRecord:
    """What one finished unit leaves behind; the final pass sums these, never per-image data."""

    unit: str
    uri: str
    fingerprint: str
    run: str
    modes: list[str]
    written: list[str]
    skipped: list[str]
    failed: list[str]
    recovered: int
    sums: dict[str, dict]  # mode -> ModeSums.to_json()
    agreement: dict | None  # {"inter": [...], "union": [...]} per value, mode=both

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, "version": 1, **dataclasses.asdict(self)}


def build_record(
    ref: UnitRef,
    uri: str,
    run_id: str,
    modes: tuple[str, ...],
    class_names: list[str],
    lines: Iterable[dict],
    written: list[str],
    skipped: list[str],
    failed: list[str],
    recovered: int,
) -> tuple[UnitRecord, list[dict]]:
    """The unit's record and its images rows, from the stats lines of every mask the unit has."""
    names = _names(class_names)
    n, primary = len(names), modes[-1]
    sums = {m: ModeSums.zeros(n) for m in modes}
    inter, union = np.zeros(n), np.zeros(n)
    rows = []
    for line in lines:
        tags = line.get("tags", [])
        for m in modes:
            sums[m].add_line(line if m == primary else line.get(m, {}), tags, names)
        for name, (i, u) in line.get("agreement", {}).items():
            if name in names:
                inter[names.index(name)] += i
                union[names.index(name)] += u
        rows.append(image_values(line, modes, class_names))
    record = UnitRecord(
        ref.name,
        uri,
        ref.fingerprint,
        run_id,
        list(modes),
        written,
        skipped,
        failed,
        recovered,
        {m: s.to_json() for m, s in sums.items()},
        {"inter": inter.tolist(), "union": union.tolist()} if len(modes) > 1 else None,
    )
    return record, rows


def write_record(output: str, ref: UnitRef, record: UnitRecord, rows: list[dict]) -> None:
    """Images rows first, the record last: a record always has its rows (each put is atomic)."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    storage.put_bytes(ref.images(output), body.encode("utf-8"))
    storage.put_bytes(ref.record(output), json.dumps(record.to_json(), ensure_ascii=False).encode("utf-8"))


@dataclasses.dataclass
class Totals:
    """Records summed: counts and per-mode arrays, O(units + classes) however many images."""

    units: int
    written: int
    skipped: int
    failed: int
    recovered: int
    arrays: dict[str, dict[str, np.ndarray]]  # mode -> sum name -> array
    confusion: dict[str, np.ndarray]  # mode -> (n, n+1) dense
    images: dict[str, int]
    gt_images: dict[str, int]
    agreement: np.ndarray | None  # (2, n) inter, union

    @classmethod
    def empty(cls, modes: Iterable[str], n: int) -> Totals:
        modes = list(modes)
        return cls(
            0,
            0,
            0,
            0,
            0,
            {m: {k: np.zeros((n, len(AREA_EDGES) - 1) if k == "area_hist" else n) for k in _SUMS} for m in modes},
            {m: np.zeros((n, n + 1)) for m in modes},
            dict.fromkeys(modes, 0),
            dict.fromkeys(modes, 0),
            np.zeros((2, n)) if len(modes) > 1 else None,
        )

    def add(self, record: dict) -> Totals:
        self.units += 1
        self.written += len(record["written"])
        self.skipped += len(record["skipped"])
        self.failed += len(record["failed"])
        self.recovered += record["recovered"]
        for mode, sums in record["sums"].items():
            if mode not in self.arrays:
                continue
            for k in _SUMS:
                self.arrays[mode][k] += np.asarray(sums[k], np.float64)
            cells = np.asarray(sums["confusion"], np.int64).reshape(-1, 3)
            if len(cells):
                np.add.at(self.confusion[mode], (cells[:, 0], cells[:, 1]), cells[:, 2])
            self.images[mode] += sums["images"]
            self.gt_images[mode] += sums["gt_images"]
        if self.agreement is not None and record.get("agreement"):
            self.agreement += np.asarray([record["agreement"]["inter"], record["agreement"]["union"]])
        return self

    def merge(self, other: Totals) -> Totals:
        for field in ("units", "written", "skipped", "failed", "recovered"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        for mode in self.arrays:
            for k in _SUMS:
                self.arrays[mode][k] += other.arrays[mode][k]
            self.confusion[mode] += other.confusion[mode]
            self.images[mode] += other.images[mode]
            self.gt_images[mode] += other.gt_images[mode]
        if self.agreement is not None and other.agreement is not None:
            self.agreement += other.agreement
        return self


def read_records(uris: Iterable[str], threads: int = 16) -> Iterator[dict]:
    """Records fetched in parallel threads, in order."""
    with ThreadPoolExecutor(threads) as pool:
        yield from (json.loads(data) for data in pool.map(storage.get_bytes, uris))


def sum_records(uris: list[str], modes: Iterable[str], n: int) -> Totals:
    totals = Totals.empty(modes, n)
    for record in read_records(uris):
        totals.add(record)
    return totals


RECORDS_PER_TASK = 512


def sum_records_parallel(uris: list[str], modes: tuple[str, ...], n: int) -> Totals:
    """``sum_records``; in Ray tasks of ``RECORDS_PER_TASK`` records when Ray is up and there are many."""
    import ray

    if len(uris) <= 2 * RECORDS_PER_TASK or not ray.is_initialized():
        return sum_records(uris, modes, n)
    task = ray.remote(num_cpus=0.5)(sum_records)
    refs = [task.remote(uris[i : i + RECORDS_PER_TASK], modes, n) for i in range(0, len(uris), RECORDS_PER_TASK)]
    totals = Totals.empty(modes, n)
    for part in ray.get(refs):
        totals.merge(part)
    return totals


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [None if d == 0 else round(float(x) / float(d), 6) for x, d in zip(num, den)]


def quality_report(totals: Totals, class_names: list[str], modes: tuple[str, ...]) -> dict:
    """``quality.json``: per class and mode the images, area distribution, confidence, absent tags, agreement."""
    names = _names(class_names)
    report = {"format": "clustercam-label-quality", "version": 1, "area_edges": list(AREA_EDGES), "modes": {}}
    for mode in modes:
        a = totals.arrays[mode]
        classes = {}
        for v, name in enumerate(names):
            classes[name] = {
                "images": int(a["present"][v]),
                "tagged": int(a["tagged"][v]),
                "absent_when_tagged": int(a["absent"][v]),
                "absent_rate": _ratio(a["absent"][v : v + 1], a["tagged"][v : v + 1])[0],
                "mean_area": _ratio(a["area_sum"][v : v + 1], a["present"][v : v + 1])[0],
                "area_histogram": [int(x) for x in a["area_hist"][v]],
                "mean_confidence": _ratio(a["conf_sum"][v : v + 1], a["conf_n"][v : v + 1])[0],
            }
        report["modes"][mode] = {"images": totals.images[mode], "classes": classes}
    if totals.agreement is not None:
        iou = _ratio(totals.agreement[0], totals.agreement[1])
        report["agreement"] = {
            "between": list(modes),
            "iou": dict(zip(names, iou)),
            "miou": _mean([x for x in iou if x is not None]),
        }
    return report


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def quality_table(report: dict) -> str:
    """The per-class table the job logs: one row per class of the primary mode."""
    mode = list(report["modes"])[-1]
    agreement = report.get("agreement", {}).get("iou", {})
    head = f"{'class':<20} {'images':>8} {'tagged':>8} {'absent%':>8} {'area':>7} {'conf':>6}" + (
        f" {'agree':>6}" if agreement else ""
    )
    rows = [f"quality ({mode}):", head]

    def fmt(x, scale=1.0, width=7, digits=3):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return f"{'-':>{width}}"
        return f"{x * scale:>{width}.{digits}f}"

    for name, c in report["modes"][mode]["classes"].items():
        row = (
            f"{name[:20]:<20} {c['images']:>8} {c['tagged']:>8} {fmt(c['absent_rate'], 100, 8, 1)} "
            f"{fmt(c['mean_area'])} {fmt(c['mean_confidence'], width=6)}"
        )
        if agreement:
            row += " " + fmt(agreement.get(name), width=6)
        rows.append(row)
    return "\n".join(rows)
