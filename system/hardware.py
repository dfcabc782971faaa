"""What the hardware does fast: the default precision follows it.

bf16 autocast is a large win on GPUs and on CPUs with native bf16 instructions (AVX512-BF16, AMX),
and a large loss elsewhere: without them PyTorch emulates bf16 matmuls, many times slower than fp32.
So "auto" picks bf16 only where it is native.

``Precision`` is what a config asks for; ``resolve_precision`` turns it into the ``Resolved``
precision of one device (its name, dtype and autocast context), the one form training and
labelling use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from functools import lru_cache
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A concrete precision: ``name`` is fp32, bf16 or fp16."""

    name: Literal["fp32", "bf16", "fp16"]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def __str__(self) -> str:
        return self.name


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """oneDNN's own check (AVX512-BF16 or AMX), else the CPU flags."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        return bool(check())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class CudaUnusable(RuntimeError):
    """A job asked for a GPU and got a worker whose CUDA cannot run: stop before any work, never
    fall back to the CPU (a 32-GPU run would quietly train on CPUs)."""


def cuda_unusable_reason() -> str | None:
    """None when CUDA works here; else why not, in CUDA's own words (no driver, a driver too old for
    this torch build, no device visible)."""
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError depending on the cause
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    return "no CUDA device is visible to this process"


def require_cuda(what: str) -> None:
    """Raise ``CudaUnusable`` naming ``what`` asked for it, this node and the cause, unless CUDA works."""
    reason = cuda_unusable_reason()
    if reason is not None:
        build = f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}"
        raise CudaUnusable(
            f"{what} asked for a GPU, but CUDA is not usable on {socket.gethostname()}: {reason} ({build})"
        )


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(precision: Precision, device: torch.device | str) -> Resolved:
    """``auto`` → bf16 where it is native on ``device``, else fp32; explicit choices pass through."""
    if precision not in ("auto", *_DTYPES):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        return Resolved("bf16" if native_bf16(device) else "fp32")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return Resolved(precision)


def autocast(precision: Resolved, device: torch.device | str):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision.name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=precision.dtype)
