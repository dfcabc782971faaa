"""A manifest of (id, image location, label names): ``.jsonl`` or ``.csv``, local or on S3.

JSON lines: ``{"id": ..., "image": path-or-URI, "labels": [names], "mask": optional path-or-URI}``.
CSV: a header with ``id,image,labels`` (and optionally ``mask``), label names separated by ``|``.
Relative paths are relative to the manifest's folder. An ``image`` or ``mask`` that is an http(s)
URL is fetched by the ingest task that loads it (``system.data.fetch``: retries, a per-host limit,
size and redirect bounds, private addresses refused unless ``source.fetch.allow_private``); a URL
that gives no image is a reject whose code says why (``http_404``, ``timeout``, ``too_large`` ...).
Classes are ``source.classes`` when given (then any other name is an unknown class), otherwise
every name seen, sorted. A line that cannot be parsed is a reject naming the file and line, not a
failed ingest.

The manifest is streamed line by line, never held: without ``source.classes`` a first pass collects
the class names, and ``entries()`` reads it again as it goes, so planning a manifest of millions of
lines holds only what the planner keeps.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath

from system import storage
from system.data.fetch import FetchError, fetch, is_url
from system.data.sources import BadEntry, Entry, Loaded, SourceConfig, class_list
from system.masks import decode_mask
from system.rejects import Reject


class ManifestSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.path = cfg.path
        if not self.path.endswith((".jsonl", ".csv")):
            raise ValueError(f"source.path={self.path!r}: a manifest must be a .jsonl or .csv file")
        self.base = self.path.rsplit("/", 1)[0] if "/" in self.path else "."
        if cfg.classes:
            self.class_names = class_list(cfg.classes, self.base)
        else:
            self.class_names = sorted({name for r in self._parse() if isinstance(r, Entry) for name in r.labels})

    def _resolve(self, location: str) -> str:
        if is_url(location) or storage.is_s3(location) or location.startswith("file://"):
            return location
        if PurePosixPath(location).is_absolute():
            return location
        return storage.join(self.base, location)

    def _rows(self):
        with storage.open_read(self.path) as raw:
            yield from self._text_rows(io.TextIOWrapper(raw, encoding="utf-8", newline=""))

    def _text_rows(self, text: io.TextIOBase):
        if self.path.endswith(".jsonl"):
            for line, raw in enumerate(text, start=1):
                if not raw.strip():
                    continue
                try:
                    yield line, json.loads(raw)
                except json.JSONDecodeError as exc:
                    yield line, f"invalid JSON ({exc.msg})"
            return
        reader = csv.DictReader(text)
        missing = {"id", "image", "labels"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{self.path}: CSV header lacks {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            row["labels"] = [n.strip() for n in (row.get("labels") or "").split("|") if n.strip()]
            yield line, {k: v for k, v in row.items() if v not in (None, "")} | {"labels": row["labels"]}

    def _parse(self):
        for line, row in self._rows():
            where = f"{self.path}:{line}"
            if isinstance(row, str):
                yield Reject("", where, "malformed", row)
                continue
            if not isinstance(row, dict):
                yield Reject("", where, "malformed", "a manifest line must be an object")
                continue
            sample_id, image, labels = row.get("id"), row.get("image"), row.get("labels")
            if not isinstance(sample_id, str) or not isinstance(image, str) or not image:
                yield Reject(str(sample_id or ""), where, "malformed", "needs string fields id and image")
                continue
            if not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
                yield Reject(sample_id, where, "malformed", "labels must be a list of class names")
                continue
            mask = row.get("mask")
            yield Entry(
                sample_id,
                self._resolve(image),
                tuple(dict.fromkeys(labels)),
                {"mask": self._resolve(mask) if isinstance(mask, str) and mask else None},
            )

    def entries(self):
        yield from self._parse()

    def _read(self, location: str) -> bytes:
        if not is_url(location):
            return storage.get_bytes(location)
        try:
            return fetch(location, self.cfg.fetch)
        except FetchError as exc:
            raise BadEntry(exc.code, str(exc)) from None

    def load(self, entry: Entry) -> Loaded:
        image = self._read(entry.image)
        mask = None
        if entry.extra["mask"] and self.cfg.masks:
            try:
                mask = decode_mask(self._read(entry.extra["mask"]))
            except BadEntry as exc:
                raise BadEntry(f"mask_{exc.code}", f"mask: {exc}") from None
            except FileNotFoundError:
                raise BadEntry("not_found", f"mask not found: {entry.extra['mask']}") from None
            except (OSError, ValueError) as exc:
                raise BadEntry("unreadable_mask", f"unreadable mask ({exc})") from None
        return Loaded(image, mask, entry.labels)
