"""What a labelling job reads: a dataset's shards or a manifest, cut into work units.

A unit is what one actor call processes: one shard or a chunk of manifest lines. Each has a name
and a fingerprint of its input (its record's name, ``system.label.records``) and its image count.
Image bytes are fetched inside the actor, never by the driver, and a manifest is streamed twice
(checks and counts, then the chunks as the job draws them) rather than held, so the driver's memory
does not grow with the corpus: the first pass keeps one 8-byte hash per row to find duplicate ids.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
from collections.abc import Container, Iterable, Iterator

import numpy as np

from system import storage
from system.data.fetch import FetchConfig, FetchError, fetch, is_url
from system.data.shards import DATASET_FILE, DatasetInfo, UnsafeId, check_id, escape_id, read_dataset, shard_uris
from system.data.sources import Entry, SourceConfig
from system.data.sources.manifest import ManifestSource
from system.data.stream import shard_samples
from system.label.records import UnitRef, fingerprint
from system.rejects import Reject

IMAGE_EXTS = ("jpg", "png", "webp")


class ClassMismatch(ValueError):
    """The model's classes and the input's do not line up; the job must not start."""


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    uri: str
    entries: tuple[Entry, ...] = ()
    name: str = ""
    fingerprint: str = ""
    images: int | None = None

    @property
    def is_shard(self) -> bool:
        return not self.entries

    @property
    def ref(self) -> UnitRef:
        return UnitRef(self.name or f"unit-{self.index:06d}", self.fingerprint or fingerprint(self.uri))


@dataclasses.dataclass
class Sample:
    key: str
    id: str
    labels: tuple[int, ...]
    image: bytes | None
    gt: bytes | None
    source: str
    error: Reject | None = None

    def reject(self, code: str, reason: str) -> Reject:
        return Reject(self.id, self.source, code, reason, self.key)


@dataclasses.dataclass
class InputPlan:
    units: Iterable[Unit]  # a dataset's list; a manifest's are streamed (iterate once)
    class_names: list[str]
    kind: str  # "dataset" | "manifest"
    info: DatasetInfo | None  # None for a manifest
    total: int
    rejects: list[Reject]  # a manifest's duplicate ids join while its units are drawn
    unit_count: int = 0


def _is_dataset(data: str) -> bool:
    return storage.exists(storage.join(data, DATASET_FILE))


def check_classes(
    model_classes: int | None, model_names: list[str] | None, input_names: list[str] | None, where: str
) -> list[str]:
    """The class names the job uses, or ClassMismatch naming both sides."""
    if model_names and input_names and list(model_names) != list(input_names):
        diff = [f"{i}: model {m!r} vs data {d!r}" for i, (m, d) in enumerate(zip(model_names, input_names)) if m != d]
        raise ClassMismatch(
            f"{where}: class names differ from the model's ({len(model_names)} vs {len(input_names)} classes; "
            f"{'; '.join(diff[:5]) or 'one list is longer'})"
        )
    names = list(input_names or model_names or [])
    if not names:
        raise ClassMismatch(f"{where}: no class names (the model has no model.json; set class_names=[...])")
    if model_classes is not None and len(names) != model_classes:
        raise ClassMismatch(f"{where}: {len(names)} classes but the model has {model_classes}")
    return names


def plan_inputs(data: str, model_classes: int | None, model_names: list[str] | None, chunk: int) -> InputPlan:
    """Resolve ``data`` into units; checks the class lists against the model before anything runs.

    ``model_classes`` None (evaluation, no model) takes the input's classes as they are.
    """
    if _is_dataset(data):
        info = read_dataset(data)
        names = check_classes(model_classes, model_names, info.classes, f"dataset {data}")
        units = [
            Unit(i, uri, (), shard.name.rsplit(".", 1)[0], fingerprint(shard.sha256, shard.samples), shard.samples)
            for i, (uri, shard) in enumerate(zip(shard_uris(data, info), info.shards))
        ]
        return InputPlan(units, names, "dataset", info, info.total_samples, [], len(units))
    if not data.endswith((".jsonl", ".csv")):
        raise FileNotFoundError(f"data={data!r}: neither a dataset (no {DATASET_FILE}) nor a .jsonl/.csv manifest")
    storage.check_readable(data)
    source = ManifestSource(SourceConfig(format="manifest", path=data, classes=list(model_names or [])))
    rejects: list[Reject] = []
    hashes = array.array("Q")
    labels: set[str] = set()
    for item in _checked(source, rejects):
        hashes.append(_key_hash(escape_id(item.id)))
        labels.update(item.labels)
    names = check_classes(
        model_classes, model_names, source.class_names if not model_names else None, f"manifest {data}"
    )
    unknown = sorted(labels - set(names))
    if unknown:
        raise ClassMismatch(f"manifest {data}: labels {unknown[:10]} are not among the model's classes")
    values, counts = np.unique(np.frombuffer(hashes, dtype=np.uint64), return_counts=True)
    repeated = {int(v) for v in values[counts > 1]}
    rows = len(hashes) + len(rejects)
    kept = len(values)
    del hashes, values, counts
    plan = InputPlan([], names, "manifest", None, rows, rejects, -(-kept // chunk))
    plan.units = _manifest_units(data, source, chunk, repeated, plan.rejects)
    return plan


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _checked(source: ManifestSource, rejects: list[Reject]) -> Iterator[Entry]:
    """The manifest's entries with a safe id; parse errors and unsafe ids go to ``rejects``."""
    for item in source.entries():
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        try:
            check_id(item.id)
        except UnsafeId as exc:
            rejects.append(Reject(item.id, item.image, "unsafe_id", str(exc)))
            continue
        yield item


def _manifest_units(
    data: str, source: ManifestSource, chunk: int, repeated: set[int], rejects: list[Reject]
) -> Iterator[Unit]:
    """The second pass: chunks of ``chunk`` entries; a repeated id after its first row is a reject."""
    first: dict[str, str] = {}
    entries: list[Entry] = []
    index = 0
    for item in _checked(source, []):
        key = escape_id(item.id)
        if _key_hash(key) in repeated:
            if key in first:
                reason = f"duplicate id (first at {first[key]})"
                rejects.append(Reject(item.id, item.image, "duplicate_id", reason, key))
                continue
            first[key] = item.image
        entries.append(item)
        if len(entries) == chunk:
            yield _chunk(index, data, entries)
            index, entries = index + 1, []
    if entries:
        yield _chunk(index, data, entries)


def _chunk(index: int, data: str, entries: list[Entry]) -> Unit:
    rows = [(e.id, e.image, list(e.labels or ()), (e.extra or {}).get("mask")) for e in entries]
    return Unit(index, data, tuple(entries), f"chunk-{index:06d}", fingerprint(rows), len(entries))


def _shard_sample(raw: dict, uri: str, class_index: dict[str, int]) -> Sample:
    key = raw["__key__"]
    try:
        meta = json.loads(raw["json"])
        sample_id, labels = str(meta["id"]), tuple(int(k) for k in meta["labels"])
    except (KeyError, TypeError, ValueError) as exc:
        return Sample(
            key,
            key,
            (),
            None,
            None,
            uri,
            Reject(key, uri, "malformed", f"bad sample metadata ({type(exc).__name__}: {exc})", key),
        )
    bad = [k for k in labels if not 0 <= k < len(class_index)]
    image = next((raw[ext] for ext in IMAGE_EXTS if ext in raw), None)
    sample = Sample(key, sample_id, labels, image, raw.get("mask.png"), uri)
    if bad:
        sample.error = sample.reject("malformed", f"labels {bad} outside 0..{len(class_index) - 1}")
    elif image is None:
        sample.error = sample.reject("no_image", "no jpg/png/webp member")
    return sample


def _read_member(uri: str, what: str) -> tuple[bytes | None, str, str]:
    """(bytes, "", "") or (None, code, reason). A transient storage fault is raised, not returned: it is
    not a property of the input, and the unit is retried."""
    if is_url(uri):  # a manifest of URLs, fetched as ingest fetches them (public addresses only)
        try:
            return fetch(uri, FetchConfig()), "", ""
        except FetchError as exc:
            return None, exc.code, f"cannot read {what} ({exc})"
    try:
        return storage.get_bytes(uri), "", ""
    except (FileNotFoundError, OSError, storage.StorageError) as exc:
        if storage.is_transient(exc):
            raise
        code = "not_found" if isinstance(exc, FileNotFoundError) else "unreadable"
        return None, code, f"cannot read {what} ({type(exc).__name__}: {exc})"


def _manifest_sample(entry: Entry, class_index: dict[str, int]) -> Sample:
    key = escape_id(entry.id)
    labels = tuple(sorted(class_index[n] for n in entry.labels))
    image, code, reason = _read_member(entry.image, "image")
    if image is None:
        return Sample(key, entry.id, labels, None, None, entry.image, Reject(entry.id, entry.image, code, reason, key))
    gt = None
    mask_uri = (entry.extra or {}).get("mask")
    if mask_uri:
        gt, code, reason = _read_member(mask_uri, "GT mask")
        if gt is None:
            reject = Reject(entry.id, mask_uri, f"mask_{code}", reason, key)
            return Sample(key, entry.id, labels, None, None, mask_uri, reject)
    return Sample(key, entry.id, labels, image, gt, entry.image)


def unit_samples(unit: Unit, class_index: dict[str, int], skip: Container[str] = frozenset()) -> Iterator[Sample | str]:
    """The unit's samples to label, in order; keys in ``skip`` come back as bare strings (not read further)."""
    if unit.is_shard:
        for raw in shard_samples(unit.uri):
            if raw["__key__"] in skip:
                yield raw["__key__"]
            else:
                yield _shard_sample(raw, unit.uri, class_index)
        return
    for entry in unit.entries:
        key = escape_id(entry.id)
        yield key if key in skip else _manifest_sample(entry, class_index)
