"""Source -> shards, as pure functions the Ray pipeline fans out (``workers/ingest.py``).

Planning lists every input once, refuses unusable ids and duplicates (by 8-byte id hashes), and
cuts the rest into fixed-size groups in source order, spooled to a local file (``GroupSpool``) so
the driver holds per shard an offset and a fingerprint, not the entries: shard *i* always gets the
same inputs, whatever ran before. Each group's *fingerprint* (format version, source settings,
classes, its entries) goes into a small record ``_parts/shard-%06d.json`` written right after the
shard; a re-run skips a shard whose record exists with the same fingerprint, so a killed or
repeated ingest redoes only what is missing, and changed inputs or settings are never mistaken for
done work. Image checks run inside the shard's task, so a shard holds at most ``shard_size``
samples (fewer when some are rejected); a task reads ``load_threads`` inputs at once (URL fetches
and S3 reads overlap), in order, a bounded window ahead.
``finalize`` writes ``rejects.jsonl`` and then ``dataset.json`` - the file that makes the dataset
exist - only if their content changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from system import storage
from system.data.shards import (
    DATASET_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PARTIAL_LABELS,
    REJECTS_FILE,
    DatasetInfo,
    RejectCounts,
    ShardInfo,
    UnsafeId,
    check_id,
    escape_id,
    shard_name,
    write_tar,
)
from system.data.sources import BadEntry, Entry, Source
from system.data.validate import Verify, sample_members
from system.rejects import Reject

PARTS_DIR = "_parts"


def _entry_record(entry: Entry) -> dict:
    """An entry as JSON: its fields, leaving out ``negatives`` when unset (complete labels)."""
    record = vars(entry)  # asdict's deep copies cost more than the JSON
    return record if entry.negatives is not None else {k: v for k, v in record.items() if k != "negatives"}


def _entry_from_record(record: dict) -> Entry:
    negatives = record.get("negatives")
    return Entry(
        record["id"],
        record["image"],
        tuple(record["labels"]) if record["labels"] is not None else None,
        record["extra"],
        tuple(negatives) if negatives is not None else None,
    )


class GroupSpool:
    """The planned shard groups, spooled to a local temporary file: one JSON line per group.

    The driver keeps only each group's offset, size and fingerprint, so its memory grows with
    shards, not images; a group's entries are read back when its task is submitted. A sequence
    (``len``, indexing, iteration), so callers index groups as they would a list.
    """

    def __init__(self, class_names: list[str], settings: dict):
        self.class_names, self.settings = class_names, settings
        self.file = tempfile.TemporaryFile()
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.fingerprints: list[str] = []
        self._lock = threading.Lock()

    def add(self, entries: list[Entry]) -> None:
        line = json.dumps([_entry_record(e) for e in entries], sort_keys=True, ensure_ascii=True).encode()
        with self._lock:
            self.file.seek(0, io.SEEK_END)
            self.offsets.append(self.file.tell())
            self.file.write(line + b"\n")
        self.sizes.append(len(entries))
        self.fingerprints.append(fingerprint(entries, self.class_names, self.settings))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> list[Entry]:
        with self._lock:
            self.file.seek(self.offsets[index])
            line = self.file.readline()
        return [_entry_from_record(r) for r in json.loads(line)]

    def __iter__(self) -> Iterator[list[Entry]]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        self.file.close()


class SeenIds:
    """Ids seen so far, as 8-byte hashes in a set: a fraction of the memory of the id strings.

    Two different ids share a hash with probability about n^2 / 2^65 (2e-6 at 9M ids); the later
    one would then be refused as a duplicate.
    """

    def __init__(self):
        self.hashes: set[int] = set()

    def add(self, key: str) -> bool:
        """Whether ``key`` is new (it is remembered either way)."""
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        if digest in self.hashes:
            return False
        self.hashes.add(digest)
        return True


@dataclass
class IngestPlan:
    groups: GroupSpool
    rejects: list[dict] = field(default_factory=list)
    inputs: int = 0


def plan(source: Source, shard_size: int, settings: dict | None = None) -> IngestPlan:
    """List the source once into groups of ``shard_size`` spooled with their fingerprints
    (``settings``: the ingest settings a fingerprint covers); unusable ids and duplicates are rejects."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out = IngestPlan(GroupSpool(source.class_names, settings or {}))
    group: list[Entry] = []
    seen = SeenIds()
    for item in source.entries():
        out.inputs += 1
        if isinstance(item, Reject):
            out.rejects.append(item.line())
            continue
        try:
            check_id(item.id)
        except UnsafeId as exc:
            out.rejects.append(Reject(item.id, item.image, "unsafe_id", str(exc)).line())
            continue
        key = escape_id(item.id)
        if not seen.add(key):
            out.rejects.append(Reject(item.id, item.image, "duplicate_id", "duplicate id (seen earlier)", key).line())
            continue
        group.append(item)
        if len(group) == shard_size:
            out.groups.add(group)
            group = []
    if group:
        out.groups.add(group)
    return out


def fingerprint(entries: list[Entry], class_names: list[str], settings: dict) -> str:
    payload = {
        "format": [FORMAT_NAME, FORMAT_VERSION],
        "settings": settings,
        "classes": class_names,
        "entries": [_entry_record(e) for e in entries],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


@dataclass
class ShardTask:
    """Everything one shard's task needs besides the source."""

    index: int
    entries: list[Entry]
    output: str
    class_names: list[str]
    fingerprint: str
    max_pixels: int = 50_000_000
    verify: Verify = "structure"
    load_threads: int = 8


def _part_uri(output: str, index: int) -> str:
    return storage.join(output, PARTS_DIR, shard_name(index).replace(".tar", ".json"))


def read_part(output: str, index: int) -> dict | None:
    try:
        return json.loads(storage.get_bytes(_part_uri(output, index)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _load_sample(source: Source, entry: Entry, class_index: dict[str, int], task: ShardTask):
    try:
        return sample_members(entry, source.load(entry), class_index, task.max_pixels, task.verify)
    except FileNotFoundError as exc:
        raise BadEntry("not_found", f"file not found: {exc.args[0] if exc.args else entry.image}") from None
    except BadEntry:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadEntry("unreadable", f"unreadable input ({type(exc).__name__}: {exc})") from None


def _ordered(pool: ThreadPoolExecutor, fn, items, window: int):
    """``fn`` over ``items`` in ``pool``, results in order, at most ``window`` ahead: URL fetches and
    storage reads overlap while a shard holds only a window of images in memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max(1, window):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_shard(source: Source, task: ShardTask) -> dict:
    """Write shard ``task.index`` and then its record; returns the record (counts, sha256, rejects)."""
    class_index = {name: i for i, name in enumerate(task.class_names)}
    rejects: list[dict] = []
    counts = {"samples": 0, "masks": 0, "partial": 0}

    def load(entry: Entry):
        try:
            return _load_sample(source, entry, class_index, task)
        except BadEntry as exc:
            return exc

    def samples():
        with ThreadPoolExecutor(max(1, task.load_threads), thread_name_prefix="ingest-load") as pool:
            for entry, loaded in zip(task.entries, _ordered(pool, load, task.entries, 2 * task.load_threads)):
                if isinstance(loaded, BadEntry):
                    rejects.append(Reject(entry.id, entry.image, loaded.code, str(loaded), escape_id(entry.id)).line())
                    continue
                members, has_mask, partial = loaded
                counts["samples"] += 1
                counts["masks"] += int(has_mask)
                counts["partial"] += int(partial)
                yield escape_id(entry.id), members

    name = shard_name(task.index)
    with storage.open_write(storage.join(task.output, name)) as f:
        size, digest = write_tar(f, samples())
    record = {
        "index": task.index,
        "name": name,
        "fingerprint": task.fingerprint,
        "inputs": len(task.entries),
        "samples": counts["samples"],
        "masks": counts["masks"],
        "partial": counts["partial"],
        "bytes": size,
        "sha256": digest,
        "rejects": rejects,
    }
    storage.put_bytes(_part_uri(task.output, task.index), json.dumps(record, sort_keys=True, indent=1).encode())
    return record


def put_if_changed(uri: str, data: bytes) -> None:
    """A re-run that produces the same file leaves the stored one (and its timestamp) alone."""
    try:
        if storage.get_bytes(uri) == data:
            return
    except FileNotFoundError:
        pass
    storage.put_bytes(uri, data)


def finalize(
    output: str,
    name: str,
    class_names: list[str],
    parts: list[dict],
    plan_rejects: list[dict],
    inputs: int,
    source_settings: dict,
) -> DatasetInfo:
    rejects = list(plan_rejects) + [r for part in parts for r in part["rejects"]]
    total = sum(p["samples"] for p in parts)
    if total + len(rejects) != inputs:
        raise RuntimeError(f"{output}: {total} ingested + {len(rejects)} rejected != {inputs} inputs")
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects)
    put_if_changed(storage.join(output, REJECTS_FILE), lines.encode("utf-8"))
    partial = sum(p.get("partial", 0) for p in parts)  # records written before partial labels lack it
    info = DatasetInfo(
        name=name,
        classes=list(class_names),
        shards=[ShardInfo(p["name"], p["samples"], p["bytes"], p["sha256"]) for p in parts],
        total_samples=total,
        total_bytes=sum(p["bytes"] for p in parts),
        samples_with_masks=sum(p["masks"] for p in parts),
        inputs=inputs,
        rejected=RejectCounts(len(rejects), dict(sorted(Counter(r["code"] for r in rejects).items()))),
        source=source_settings,
        extra={PARTIAL_LABELS: partial} if partial else {},
    )
    put_if_changed(storage.join(output, DATASET_FILE), info.encode())
    return info
