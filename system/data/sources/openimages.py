"""OpenImages image-level labels: labels CSV + class-descriptions CSV + image folder.

Labels are partial: for each image the human-verified rows say which classes are present
(``Confidence`` 1) and which are verified absent (``Confidence`` 0); every other class - including
machine labels, whose confidence is fractional - is unknown, and the entry carries its verified
negatives so the losses can leave the unknown ones out. Classes listed in ``source.exhaustive``
are complete: an image not tagged with one is a negative for it.

With ``source.hierarchy`` (``bbox_labels_600_hierarchy.json``) labels follow the class tree as
OpenImages' own evaluation expands them: a positive also tags its ancestors, a verified negative
makes its descendants negative too (the root, "Entity", is not a class).

``source.classes`` picks a subset (display names or MIDs, in the order given; ``@file`` items read
them from a file, e.g. ``class-descriptions-boxable.csv`` for the 600 boxable classes); labels
outside it are dropped, and an image left with no positive is rejected as having no labels. Display
names that repeat in the descriptions get their MID appended so class names stay unique.

Full size (9M images, 30M+ rows) in bounded memory: the labels CSV is streamed, and an image's rows
are collected while they are consecutive. The official files are sorted by ImageID; that is checked
in a first pass over the ImageID column, not assumed: a file that is not sorted is grouped by an
external sort (sorted runs in temporary files, merged), so memory never holds the whole file. A
malformed row is a reject naming its line; the rest ingests. The two CSVs are found by their
published names in the dataset root (never by listing the image tree), or given explicitly.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from system import storage
from system.data.sources import Entry, Loaded, SourceConfig, class_list
from system.rejects import Reject

ROOT_CLASS = "/m/0bl9f"  # "Entity", the hierarchy's root
SORT_RUN_ROWS = 500_000  # rows per sorted run of the external sort (a run is held in memory)


def labels_file_names(split: str) -> list[str]:
    """The published names of a split's human image-level labels CSV (V5 to V7, boxable subset)."""
    return [
        f"oidv7-{split}-annotations-human-imagelabels.csv",
        f"oidv6-{split}-annotations-human-imagelabels.csv",
        f"{split}-annotations-human-imagelabels.csv",
        f"{split}-annotations-human-imagelabels-boxable.csv",
    ]


CLASSES_FILE_NAMES = [  # in order of preference: the full descriptions cover the boxable ones
    "oidv7-class-descriptions.csv",
    "oidv6-class-descriptions.csv",
    "class-descriptions.csv",
    "class-descriptions-boxable.csv",
]


def _find_labels(root: str, split: str) -> str:
    names = labels_file_names(split)
    found = [storage.join(root, n) for n in names if storage.exists(storage.join(root, n))]
    if len(found) != 1:
        what = "none of" if not found else "more than one of"
        raise FileNotFoundError(
            f"{root}: {what} the labels CSVs {names} (found: {[f.rsplit('/', 1)[-1] for f in found]}); "
            "set source.labels_file"
        )
    return found[0]


def _find_classes(root: str) -> str:
    for name in CLASSES_FILE_NAMES:
        if storage.exists(storage.join(root, name)):
            return storage.join(root, name)
    raise FileNotFoundError(
        f"{root}: none of the class descriptions CSVs {CLASSES_FILE_NAMES}; set source.classes_file"
    )


def _under(root: str, path: str) -> str:
    """``path`` itself when absolute or a URI, else relative to the dataset root."""
    return path if storage.is_s3(path) or path.startswith(("/", "file://")) else storage.join(root, path)


def _rows(uri: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) of a CSV, streamed."""
    with storage.open_read(uri) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""))
        for row in reader:
            yield reader.line_num, row


def _closure(start: Iterable[str], edges: dict[str, tuple[str, ...]]) -> set[str]:
    out: set[str] = set()
    stack = list(start)
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in out:
                out.add(nxt)
                stack.append(nxt)
    return out


@dataclass(frozen=True)
class Hierarchy:
    """The class tree: ``parents[mid]`` / ``children[mid]`` are the classes directly above / below."""

    parents: dict[str, tuple[str, ...]]
    children: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, uri: str) -> Hierarchy:
        try:
            tree = json.loads(storage.get_bytes(uri))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}: not a class hierarchy JSON ({exc})") from None
        parents: dict[str, set[str]] = {}
        stack = [tree]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
                raise ValueError(f"{uri}: every node needs a LabelName (got {str(node)[:80]})")
            for child in node.get("Subcategory", []):  # "Part" is part-of, not is-a: not expanded
                if node["LabelName"] != ROOT_CLASS:
                    parents.setdefault(child.get("LabelName"), set()).add(node["LabelName"])
                stack.append(child)
        children: dict[str, set[str]] = {}
        for mid, above in parents.items():
            for parent in above:
                children.setdefault(parent, set()).add(mid)
        return cls(
            {m: tuple(sorted(p)) for m, p in parents.items()}, {m: tuple(sorted(c)) for m, c in children.items()}
        )

    def ancestors(self, mids: Iterable[str]) -> set[str]:
        return _closure(mids, self.parents)

    def descendants(self, mids: Iterable[str]) -> set[str]:
        return _closure(mids, self.children)


class OpenImagesSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.labels_file = cfg.labels_file or _find_labels(cfg.path, cfg.split)
        self.classes_file = cfg.classes_file or _find_classes(cfg.path)
        self.images = cfg.images or storage.join(cfg.path, cfg.split)
        descriptions = [
            row[:2] for _, row in _rows(self.classes_file) if len(row) >= 2 and row[:2] != ["LabelName", "DisplayName"]
        ]
        counts: dict[str, int] = {}
        for _, name in descriptions:
            counts[name] = counts.get(name, 0) + 1
        names = {mid: (name if counts[name] == 1 else f"{name} ({mid})") for mid, name in descriptions}
        by_name = {v: k for k, v in names.items()}

        def mids_of(classes: list[str], key: str) -> list[str]:
            unknown = [c for c in classes if c not in names and c not in by_name]
            if unknown:
                raise ValueError(f"source.{key}: {unknown[:10]} are not in {self.classes_file}")
            return list(dict.fromkeys(c if c in names else by_name[c] for c in classes))

        mids = mids_of(class_list(cfg.classes, cfg.path), "classes") if cfg.classes else list(names)
        self._mid_to_name = {mid: names[mid] for mid in mids}
        self.class_names = [names[mid] for mid in mids]
        self._exhaustive = frozenset(mids_of(class_list(cfg.exhaustive, cfg.path), "exhaustive"))
        self._hierarchy = Hierarchy.load(_under(cfg.path, cfg.hierarchy)) if cfg.hierarchy else None

    def _columns(self, header: list[str]) -> tuple[int, int, int]:
        try:
            return tuple(header.index(c) for c in ("ImageID", "LabelName", "Confidence"))
        except ValueError:
            raise ValueError(
                f"{self.labels_file}: needs columns ImageID, LabelName, Confidence (got {header})"
            ) from None

    def _records(self) -> Iterator[tuple[str, str, str, int] | Reject]:
        """(image id, MID, "1" | "0" | other, line) per row; a malformed row is a reject naming its line."""
        rows = _rows(self.labels_file)
        _, header = next(rows, (1, []))
        col_id, col_label, col_conf = self._columns(header)
        width = max(col_id, col_label, col_conf) + 1
        for line, row in rows:
            if not row:
                continue
            try:
                if len(row) < width or not row[col_id] or not row[col_label]:
                    raise ValueError
                confidence = float(row[col_conf])
            except ValueError:
                image_id = row[col_id] if len(row) > col_id else ""
                yield Reject(image_id, f"{self.labels_file}:{line}", "malformed", f"malformed labels row {line}")
                continue
            verdict = "1" if confidence == 1.0 else "0" if confidence == 0.0 else "?"
            yield row[col_id], row[col_label], verdict, line

    def _sorted_by_id(self) -> bool:
        """Whether the file's ImageIDs never decrease (then every image's rows are consecutive)."""
        previous = ""
        for record in self._records():
            if isinstance(record, Reject):
                continue
            if record[0] < previous:
                return False
            previous = record[0]
        return True

    def _externally_sorted(self, folder: str) -> Iterator[tuple[str, str, str, int] | Reject]:
        """The records sorted by (image id, line): sorted runs spilled to ``folder``, then merged."""
        runs: list[str] = []
        run: list[tuple[str, str, str, int]] = []

        def spill() -> None:
            path = os.path.join(folder, f"run-{len(runs):05d}.csv")
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows(sorted(run, key=lambda r: (r[0], r[3])))
            runs.append(path)
            run.clear()

        for record in self._records():
            if isinstance(record, Reject):
                yield record
                continue
            run.append(record)
            if len(run) == SORT_RUN_ROWS:
                spill()
        if run:
            spill()

        def read(path: str) -> Iterator[tuple[str, str, str, int]]:
            with open(path, encoding="utf-8", newline="") as f:
                for image_id, mid, verdict, line in csv.reader(f):
                    yield image_id, mid, verdict, int(line)

        yield from heapq.merge(*(read(p) for p in runs), key=lambda r: (r[0], r[3]))

    def entries(self):
        if self._sorted_by_id():
            yield from self._grouped(self._records(), check_order=True)
            return
        with tempfile.TemporaryDirectory(prefix="openimages-sort-") as folder:
            yield from self._grouped(self._externally_sorted(folder), check_order=False)

    def _grouped(self, records: Iterable, check_order: bool) -> Iterator[Entry | Reject]:
        current, rows = None, []
        for record in records:
            if isinstance(record, Reject):
                yield record
                continue
            if record[0] != current:
                if current is not None:
                    if check_order and record[0] < current:  # the file changed since the first pass
                        raise ValueError(
                            f"{self.labels_file}:{record[3]}: ImageID {record[0]!r} after {current!r}; the file "
                            "is no longer sorted by ImageID (was it rewritten during the ingest?)"
                        )
                    yield self._entry(current, rows)
                current, rows = record[0], []
            rows.append(record)
        if current is not None:
            yield self._entry(current, rows)

    def _entry(self, image_id: str, rows: list[tuple[str, str, str, int]]) -> Entry:
        positives = {mid for _, mid, verdict, _ in rows if verdict == "1"}
        negatives = {mid for _, mid, verdict, _ in rows if verdict == "0"}
        if self._hierarchy is not None:
            positives |= self._hierarchy.ancestors(positives)
            negatives |= self._hierarchy.descendants(negatives)
        negatives = (negatives | self._exhaustive) - positives
        return Entry(
            id=image_id,
            image=storage.join(self.images, f"{image_id}.jpg"),
            labels=tuple(self._mid_to_name[m] for m in sorted(positives) if m in self._mid_to_name),
            negatives=tuple(self._mid_to_name[m] for m in sorted(negatives) if m in self._mid_to_name),
        )

    def load(self, entry: Entry) -> Loaded:
        return Loaded(storage.get_bytes(entry.image), None, entry.labels, entry.negatives)
