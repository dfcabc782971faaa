"""A checkpoint file with code planted in it: the genuine contents plus one object whose unpickling
runs a shell command that creates a marker file, so a test can tell whether anything ran."""

from __future__ import annotations

import io
import os
import shlex
from pathlib import Path

import torch

from workers.checkpoint import load_data


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def planted_bytes(path: Path, marker: Path) -> bytes:
    """``path``'s checkpoint with a payload added next to its real entries, saved as torch does."""
    state = load_data(str(path))
    state["planted"] = Payload(marker)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
