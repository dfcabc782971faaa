"""OpenImages image-level labels: labels CSV + class-descriptions CSV + image folder.

Only verified positives (``Confidence`` 1) become tags; verified negatives and machine labels are
ignored. ``source.classes`` picks a subset (display names or MIDs, in the order given); labels
outside it are dropped, and an image left with none is rejected as having no labels. Display names
that repeat in the descriptions get their MID appended so class names stay unique.
"""

from __future__ import annotations

import csv
import io
from fnmatch import fnmatch

from system import storage
from system.data.sources import Entry, Loaded, SourceConfig
from system.rejects import Reject


def _find(root: str, pattern: str, what: str) -> str:
    matches = [
        u
        for u in storage.list_uris(root)
        if "/" not in u[len(root.rstrip("/")) + 1 :] and fnmatch(u.rsplit("/", 1)[-1], pattern)
    ]
    if len(matches) != 1:
        found = ", ".join(m.rsplit("/", 1)[-1] for m in matches) or "none"
        raise FileNotFoundError(f"{root}: expected one {what} matching {pattern!r} (found: {found}); set it explicitly")
    return matches[0]


def _rows(uri: str):
    with storage.open_read(uri) as raw:
        yield from csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))


class OpenImagesSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.labels_file = cfg.labels_file or _find(cfg.path, f"*{cfg.split}*imagelabels*.csv", "labels CSV")
        self.classes_file = cfg.classes_file or _find(cfg.path, "*class-descriptions*.csv", "class descriptions CSV")
        self.images = cfg.images or storage.join(cfg.path, cfg.split)
        descriptions = [
            row[:2] for row in _rows(self.classes_file) if len(row) >= 2 and row[:2] != ["LabelName", "DisplayName"]
        ]
        counts: dict[str, int] = {}
        for _, name in descriptions:
            counts[name] = counts.get(name, 0) + 1
        names = {mid: (name if counts[name] == 1 else f"{name} ({mid})") for mid, name in descriptions}
        if cfg.classes:
            by_name = {v: k for k, v in names.items()}
            unknown = [c for c in cfg.classes if c not in names and c not in by_name]
            if unknown:
                raise ValueError(f"source.classes: {unknown} are not in {self.classes_file}")
            mids = [c if c in names else by_name[c] for c in cfg.classes]
        else:
            mids = list(names)
        self._mid_to_name = {mid: names[mid] for mid in mids}
        self.class_names = [names[mid] for mid in mids]

    def entries(self):
        rows = _rows(self.labels_file)
        header = next(rows, [])
        try:
            col_id, col_label, col_conf = (header.index(c) for c in ("ImageID", "LabelName", "Confidence"))
        except ValueError:
            raise ValueError(
                f"{self.labels_file}: needs columns ImageID, LabelName, Confidence (got {header})"
            ) from None
        labels: dict[str, dict[str, None]] = {}
        width = max(col_id, col_label, col_conf) + 1
        for line, row in enumerate(rows, start=2):
            try:
                confidence = float(row[col_conf]) if len(row) >= width else None
            except ValueError:
                confidence = None
            if confidence is None:
                yield Reject(
                    row[col_id] if len(row) > col_id else "",
                    f"{self.labels_file}:{line}",
                    "malformed",
                    "malformed labels row",
                )
                continue
            tags = labels.setdefault(row[col_id], {})
            if confidence == 1.0 and row[col_label] in self._mid_to_name:
                tags[self._mid_to_name[row[col_label]]] = None
        for image_id in sorted(labels):
            yield Entry(id=image_id, image=storage.join(self.images, f"{image_id}.jpg"), labels=tuple(labels[image_id]))

    def load(self, entry: Entry) -> Loaded:
        return Loaded(storage.get_bytes(entry.image), None, entry.labels)
