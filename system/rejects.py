"""One record for every input that produced no output: ingest's ``rejects.jsonl`` and labelling's
``failures/`` parts and ``label_job.json``.

``code`` comes from a small fixed vocabulary, so it can be a metrics label and a key to count by
(``corrupt``, ``not_found``, ``malformed``, ``duplicate_id``, ``write_failed``, ``unit_lost`` ...);
``reason`` is the message a person reads. ``key`` is the input's file-safe key once it has one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Reject:
    id: str
    where: str
    code: str
    reason: str
    key: str = ""

    def line(self, **extra) -> dict:
        """The JSON line, with ``extra`` fields (a labelling run's id) after the record's own."""
        return {**dataclasses.asdict(self), **extra}
