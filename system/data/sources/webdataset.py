"""WebDataset shards other tools wrote, ingested as they are: users need not unpack them.

``source.path`` is a tar, a brace pattern (``shards-{000000..000099}.tar``) or a folder (every
``.tar`` below it, sorted), local or ``s3://``. A sample is the consecutive members sharing a key,
as WebDataset groups them: one image (``jpg``, ``jpeg``, ``png`` or ``webp``) plus its labels from
a ``json`` member (the first of ``labels``, ``classes``, ``tags``, ``label``, ``class``, ``cls``:
class names or indices, one or a list) or a ``cls`` member (an integer, or several separated by
spaces or commas, or a JSON list). A ``mask.png`` member (this project's own shards) is the GT mask.
Index labels are named by ``source.classes`` or ``source.classes_file`` (one name per line, or a
JSON list); without names, index *i* is the class ``"i"``. Name labels work like a manifest's:
``source.classes`` when given, otherwise every name seen, sorted.

Nothing in the tar runs: the tar is read with the project's own reader (``walk_tar``), ``pyd`` and
``pickle`` members are never read, and only the image, ``json``, ``cls`` and ``mask.png`` bytes are
parsed (JSON and text). Listing reads each tar once, skipping image bytes (a local tar is seeked
through; an S3 tar is streamed through the driver), and remembers where each sample lies, so the
ingest task that owns a sample reads exactly its bytes (one ranged read) and nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator

from braceexpand import braceexpand

from system import storage
from system.data.shards import group_samples, read_tar, walk_tar
from system.data.sources import BadEntry, Entry, Loaded, SourceConfig
from system.masks import decode_mask
from system.rejects import Reject

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_KEYS = ("labels", "classes", "tags", "label", "class", "cls")
_READ = {"json", "cls"}  # the small members read while listing; images and anything else are skipped


def tar_uris(path: str) -> list[str]:
    """The tars ``path`` names: a brace pattern, a folder, or one tar."""
    if "{" in path:
        return list(braceexpand(path))
    if path.endswith(".tar"):
        return [path]
    found = [u for u in storage.list_uris(path) if u.endswith(".tar")]
    if not found:
        raise FileNotFoundError(f"source.path={path!r}: no .tar files (a tar, a brace pattern or a folder of tars)")
    return found


def _ext(name: str) -> str:
    base = name.rpartition("/")[2]
    return base.partition(".")[2].lower()


def _values(value) -> list:
    if isinstance(value, list):
        return value
    return [value]


def parse_labels(sample: dict) -> list[str | int]:
    """Class names and/or indices of a raw sample, from its ``json`` or ``cls`` member."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadEntry("malformed", f"json member is not JSON ({exc})") from None
        if isinstance(meta, dict):
            key = next((k for k in LABEL_KEYS if k in meta), None)
            if key is not None:
                return _checked(_values(meta[key]), f"json {key!r}")
        elif isinstance(meta, list | int | str):
            return _checked(_values(meta), "json")
    if "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        try:
            parsed = json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise BadEntry("malformed", f"cls member {text[:40]!r} is not an integer or a list of them") from None
        return _checked(_values(parsed), "cls")
    raise BadEntry("no_labels", "neither a json member with labels/classes/tags nor a cls member")


def _checked(values: list, where: str) -> list[str | int]:
    if not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in values):
        raise BadEntry("malformed", f"{where}: labels must be class names or non-negative indices")
    return values


class WebDatasetSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.tars = tar_uris(cfg.path)
        names = list(cfg.classes) or self._classes_file()
        records = list(self._scan())
        raw = [r for r in records if isinstance(r, Entry)]
        indices = sorted({v for r in raw for v in r.labels if isinstance(v, int)})
        if names:
            self.class_names = names
        elif indices:
            self.class_names = [str(i) for i in range(indices[-1] + 1)]
        else:
            self.class_names = sorted({v for r in raw for v in r.labels if isinstance(v, str)})
        self._pending = [self._named(r) if isinstance(r, Entry) else r for r in records]

    def _classes_file(self) -> list[str]:
        if not self.cfg.classes_file:
            return []
        text = storage.get_bytes(self.cfg.classes_file).decode("utf-8")
        if text.lstrip().startswith("["):
            names = json.loads(text)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{self.cfg.classes_file}: a JSON classes file must be a list of names")
            return names
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _named(self, entry: Entry) -> Entry | Reject:
        """Indices become names; an index past the class list is a reject naming it."""
        labels = []
        for value in entry.labels:
            if isinstance(value, int):
                if value >= len(self.class_names):
                    reason = f"class index {value} outside 0..{len(self.class_names) - 1}"
                    return Reject(entry.id, entry.image, "unknown_class", reason)
                value = self.class_names[value]
            labels.append(value)
        return Entry(entry.id, entry.image, tuple(dict.fromkeys(labels)), entry.extra)

    def _scan(self) -> Iterator[Entry | Reject]:
        for uri in self.tars:
            try:
                yield from self._scan_tar(uri)
            except (tarfile.ReadError, ValueError) as exc:
                raise ValueError(f"{uri}: not a readable tar ({exc})") from None

    def _scan_tar(self, uri: str) -> Iterator[Entry | Reject]:
        spans: dict[str, tuple[int, int]] = {}
        with contextlib.closing(storage.open_read(uri)) as f:
            members = walk_tar(f, want=lambda name: _ext(name) in _READ)
            for sample in group_samples(self._remember(members, spans)):
                key = sample["__key__"]
                where = f"{uri}#{key}"
                image = next((ext for ext in IMAGE_EXTS if ext in sample), None)
                if image is None:
                    yield Reject(key, where, "no_image", f"no {'/'.join(IMAGE_EXTS)} member")
                    continue
                try:
                    labels = parse_labels(sample)
                except BadEntry as exc:
                    yield Reject(key, where, exc.code, str(exc))
                    continue
                start, end = spans.pop(key)
                yield Entry(key, where, tuple(labels), {"tar": uri, "start": start, "end": end, "image": image})

    @staticmethod
    def _remember(members, spans: dict[str, tuple[int, int]]) -> Iterator[tuple[str, bytes]]:
        """Members for ``group_samples`` (skipped ones as empty bytes), noting each key's byte span."""
        for name, start, end, data in members:
            directory, _, base = name.rpartition("/")
            stem = base.partition(".")[0]
            key = f"{directory}/{stem}" if directory else stem
            first, _ = spans.get(key, (start, end))
            spans[key] = (first, end)
            yield name, b"" if data is None else data

    def entries(self):
        pending = self.__dict__.pop("_pending", None)  # a second listing scans the tars again
        if pending is None:
            pending = (self._named(r) if isinstance(r, Entry) else r for r in self._scan())
        yield from pending

    def load(self, entry: Entry) -> Loaded:
        extra = entry.extra
        blob = storage.get_range(extra["tar"], extra["start"], extra["end"])
        samples = list(group_samples(read_tar(io.BytesIO(blob))))
        if len(samples) != 1 or samples[0]["__key__"] != entry.id or extra["image"] not in samples[0]:
            moved = f"{extra['tar']} changed since it was listed (sample {entry.id} is not where it was)"
            raise BadEntry("corrupt", moved)
        sample = samples[0]
        mask = None
        if self.cfg.masks and "mask.png" in sample:
            try:
                mask = decode_mask(sample["mask.png"])
            except (OSError, ValueError) as exc:
                raise BadEntry("unreadable_mask", f"unreadable mask ({exc})") from None
        return Loaded(sample[extra["image"]], mask, entry.labels)
