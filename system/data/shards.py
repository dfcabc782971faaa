"""The shard contract: sample keys, deterministic tar files and ``dataset.json``.

A dataset is a folder (or S3 prefix) of ``shard-%06d.tar`` WebDataset files plus ``dataset.json``,
written last, which lists them; ``rejects.jsonl`` says what was left out and why.

Keys: WebDataset groups tar members by the part of the name before the first ``.``, so a key may
not contain a dot, a slash, or anything a file system mangles. :func:`escape_id` maps any id to
``[A-Za-z0-9_-]`` reversibly: ``-`` is the escape character and every other byte outside the
set becomes ``-xx`` (lower-case hex of its UTF-8 bytes). The mapping is injective, so two keys can only
collide when two ids are equal.

Tars are byte-for-byte reproducible: members in sample order, mtime 0, uid/gid 0, no user names,
mode 0444, ustar headers (pax records only for names over 100 bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from system import storage

FORMAT_VERSION = 1
FORMAT_NAME = "clustercam-wds"
DATASET_FILE = "dataset.json"
# dataset.json key: how many samples carry partial labels (a ``known`` field); absent when none do, so a
# dataset with complete labels keeps the file it always had
PARTIAL_LABELS = "partial_labels"
REJECTS_FILE = "rejects.jsonl"
MAX_KEY_LENGTH = 200
_SAFE = re.compile(rb"[A-Za-z0-9_]")


class UnsafeId(ValueError):
    """An id that cannot name a sample (empty, path-like traversal, control characters, too long)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def check_id(sample_id: str) -> None:
    """Refuse ids that are almost certainly broken input rather than names to escape."""
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise UnsafeId("empty id")
    parts = sample_id.replace("\\", "/").split("/")
    if sample_id.startswith(("/", "\\")) or any(p in ("..", ".") for p in parts):
        raise UnsafeId(f"unsafe id {sample_id!r} (absolute or relative path)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in sample_id):
        raise UnsafeId(f"unsafe id {sample_id!r} (control characters)")
    if len(escape_id(sample_id)) > MAX_KEY_LENGTH:
        raise UnsafeId(f"id too long ({len(sample_id)} characters)")


_ESCAPES = {byte: chr(byte) if _SAFE.fullmatch(bytes([byte])) else f"-{byte:02x}" for byte in range(256)}


def escape_id(sample_id: str) -> str:
    # latin-1 maps each UTF-8 byte to the code point of the same value, which translate() escapes
    return sample_id.encode("utf-8").decode("latin-1").translate(_ESCAPES)


def unescape_key(key: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "-":
            raw.append(int(key[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(key[i].encode())
            i += 1
    return raw.decode("utf-8")


_BLOCK = 512
_RECORD = 20 * _BLOCK


def _header(name: bytes, size: int, typeflag: bytes) -> bytes:
    """A ustar header with fixed metadata (mode 0444, uid/gid 0, mtime 0, no user names)."""
    header = bytearray(_BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _pax_path(name: bytes) -> bytes:
    """A pax record ``<len> path=<name>\\n`` whose length counts its own digits."""
    body = b" path=" + name + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


def _pad(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


class _TarWriter:
    """Writes, counts and hashes a tar stream, so a shard is never held whole or read back.

    Python's tarfile spends more CPU on a member's header than ingest spends checking the image; this
    writes the same ustar/pax layout directly (pax only for names over 100 bytes), which tarfile,
    GNU tar and WebDataset all read.
    """

    def __init__(self, f: BinaryIO):
        self.f, self.size, self.digest = f, 0, hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.digest.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            record = _pax_path(raw)
            self._write(_header(b"././@PaxHeader", len(record), b"x") + record + _pad(len(record)))
            raw = raw[:100]
        self._write(_header(raw, len(data), b"0"))
        self._write(data)
        self._write(_pad(len(data)))

    def close(self) -> None:
        self._write(b"\0" * (2 * _BLOCK))
        self._write(b"\0" * (-self.size % _RECORD))


def write_tar(fileobj: BinaryIO, samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> tuple[int, str]:
    """Write samples as a tar into ``fileobj``; returns its size and sha256 (bytes depend only on input)."""
    tar = _TarWriter(fileobj)
    for key, members in samples:
        for ext, data in members:
            tar.add(f"{key}.{ext}", data)
    tar.close()
    return tar.size, tar.digest.hexdigest()


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records, i = {}, 0
    while i < len(data) and data[i : i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        records[key] = value
        i += length
    return records


def _read_exactly(f: BinaryIO, size: int, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise tarfile.ReadError(f"unexpected end of data in {what} ({len(data)} of {size} bytes)")
    return data


def _skip(f: BinaryIO, size: int) -> None:
    if f.seekable():
        f.seek(size, io.SEEK_CUR)
        return
    while size > 0:
        chunk = f.read(min(size, 1 << 20))
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data in a member ({size} bytes missing)")
        size -= len(chunk)


def walk_tar(f: BinaryIO, want=None) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, start, end, data) of the regular files of a tar stream, in order: ``start`` is where the
    member's first header (a pax or GNU long-name one included) begins, ``end`` where its padding ends,
    so ``[start, end)`` of consecutive members is itself a tar. ``data`` is None for a member that
    ``want(name)`` declines: it is skipped (seeked past where the stream can seek), never read whole.

    Reads ustar headers with pax ``path`` records and GNU long names, so it reads tars other tools
    wrote; checksums are checked, and a stream cut short raises ``tarfile.ReadError``.
    """
    long_name: bytes | None = None
    offset = start = 0
    while True:
        header = f.read(_BLOCK)
        if not header or header == bytes(_BLOCK):
            return
        if len(header) != _BLOCK:
            raise tarfile.ReadError(f"unexpected end of data in a header ({len(header)} of {_BLOCK} bytes)")
        stored = _number(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError("bad tar header checksum")
        size, typeflag = _number(header[124:136]), header[156:157]
        end = offset + _BLOCK + size + (-size % _BLOCK)
        if typeflag in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix + b"/" + name
            text = name.decode("utf-8", "surrogateescape")
            if want is None or want(text):
                data = _read_exactly(f, size, "a member")
                _read_exactly(f, -size % _BLOCK, "padding")
            else:
                data = None
                _skip(f, size + (-size % _BLOCK))
            yield text, start, end, data
            long_name, start = None, end
        else:
            data = _read_exactly(f, size, "a member")
            _read_exactly(f, -size % _BLOCK, "padding")
            if typeflag == b"x":
                long_name = _pax_records(data).get(b"path", long_name)
            elif typeflag == b"L":
                long_name = data.rstrip(b"\0")
            else:
                long_name, start = None, end
        offset = end


def read_tar(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """The regular files of a tar stream, in order.

    The reading half of :class:`_TarWriter`: tarfile (and WebDataset's iterator over it) costs more
    CPU per member than decoding a small JPEG, the training stream's real work (``walk_tar``).
    """
    for name, _, _, data in walk_tar(f):
        yield name, data


def group_samples(files: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """Consecutive files sharing a key (the name up to the first dot of its last part) as one sample,
    keyed by lower-case extension, as WebDataset groups them; names without a dot are skipped."""
    sample: dict | None = None
    for name, data in files:
        directory, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = f"{directory}/{stem}" if directory else stem
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        ext = ext.lower()
        if ext in sample:
            raise ValueError(f"sample {key} holds {ext} twice")
        sample[ext] = data
    if sample is not None:
        yield sample


class DatasetFileError(ValueError):
    """A ``dataset.json`` that cannot describe a dataset; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One line of ``dataset.json``'s ``shards``."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class RejectCounts:
    total: int
    by_code: dict[str, int]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """``dataset.json``: what makes a dataset exist, and everything a reader needs to know of it.

    The file is a contract between versions: :meth:`to_json` writes the keys in the order of the
    fields below, as the ingest always has. Keys that a newer version of the same format added are
    not refused: they are kept in ``extra`` and written back after the known ones, so a reader only
    relies on what it knows and a format change that old readers must not accept bumps ``version``.
    """

    name: str
    classes: list[str]
    shards: list[ShardInfo]
    total_samples: int
    total_bytes: int
    samples_with_masks: int
    inputs: int
    rejected: RejectCounts
    source: dict
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    extra: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "version": self.version,
            "name": self.name,
            "classes": list(self.classes),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "samples_with_masks": self.samples_with_masks,
            "inputs": self.inputs,
            "rejected": {"total": self.rejected.total, "by_code": dict(self.rejected.by_code)},
            "source": self.source,
            **self.extra,
        }

    @property
    def partial_labels(self) -> bool:
        """Whether some samples leave classes unknown (training then passes the known masks on)."""
        return bool(self.extra.get(PARTIAL_LABELS))

    def encode(self) -> bytes:
        """The file's bytes (indent 1, UTF-8, a final newline): equal content, equal bytes."""
        return (json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: object, path: str = DATASET_FILE) -> DatasetInfo:
        """Check every field a reader relies on; a bad one is a ``DatasetFileError`` naming it."""
        if not isinstance(data, dict):
            raise DatasetFileError(f"{path}: not a JSON object")
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise DatasetFileError(
                f"{path}: unsupported dataset format {data.get('format')!r} v{data.get('version')!r}"
            )
        shards = [_shard(s, f"{path}: shards[{i}]") for i, s in enumerate(_field(data, "shards", list, path))]
        rejected = _field(data, "rejected", dict, path)
        by_code = _field(rejected, "by_code", dict, f"{path}: rejected")
        for code in by_code:
            _count(by_code, code, f"{path}: rejected.by_code")
        classes = _field(data, "classes", list, path)
        if not all(isinstance(c, str) for c in classes):
            raise DatasetFileError(f"{path}: field 'classes' must be a list of strings")
        info = cls(
            name=_field(data, "name", str, path),
            classes=classes,
            shards=shards,
            total_samples=_count(data, "total_samples", path),
            total_bytes=_count(data, "total_bytes", path),
            samples_with_masks=_count(data, "samples_with_masks", path),
            inputs=_count(data, "inputs", path),
            rejected=RejectCounts(_count(rejected, "total", f"{path}: rejected"), by_code),
            source=_field(data, "source", dict, path),
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )
        if info.total_samples != sum(s.samples for s in shards):
            raise DatasetFileError(
                f"{path}: field 'total_samples' is {info.total_samples} but the shards hold "
                f"{sum(s.samples for s in shards)} samples"
            )
        return info


_KNOWN_KEYS = {f.name for f in dataclasses.fields(DatasetInfo)} - {"extra"}


def _field(data: dict, key: str, kind: type, where: str):
    if key not in data:
        raise DatasetFileError(f"{where}: field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DatasetFileError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _shard(data: object, where: str) -> ShardInfo:
    if not isinstance(data, dict):
        raise DatasetFileError(f"{where}: must be an object, got {type(data).__name__}")
    return ShardInfo(
        _field(data, "name", str, where),
        _count(data, "samples", where),
        _count(data, "bytes", where),
        _field(data, "sha256", str, where),
    )


def _count(data: dict, key: str, where: str) -> int:
    value = _field(data, key, int, where)
    if value < 0:
        raise DatasetFileError(f"{where}: field {key!r} must not be negative, got {value}")
    return value


def read_dataset(uri: str) -> DatasetInfo:
    """``dataset.json`` of the dataset at ``uri``; a dataset without it does not exist (yet)."""
    path = storage.join(uri, DATASET_FILE)
    try:
        data = json.loads(storage.get_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no {DATASET_FILE} (not a dataset, or its ingest has not finished)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetFileError(f"{path}: not valid JSON ({exc})") from None
    return DatasetInfo.from_json(data, path)


def shard_uris(uri: str, info: DatasetInfo) -> list[str]:
    return [storage.join(uri, shard.name) for shard in info.shards]
