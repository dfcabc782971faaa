"""Where the authors' golden tensors live and how closely we must reproduce them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_A = Path(os.environ.get("CLUSTERCAM_GOLDEN", REPO.parent / "shared" / "golden" / "A"))


def golden(name: str):
    path = GOLDEN_A / name
    if not path.exists():
        raise FileNotFoundError(
            f"golden file {path} is missing: the golden set lives in ../shared/golden/A beside the "
            "checkout (or set CLUSTERCAM_GOLDEN)"
        )
    return torch.load(path)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal to ``tol`` relative, per element, with the absolute floor at ``tol`` x the largest value.

    The floor matters for min-max normalised maps, whose near-zero pixels carry the float32
    rounding of the whole 12-block chain.
    """
    expected = expected.to(actual.dtype)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)
