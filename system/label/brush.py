"""Label Studio's brush RLE: how a ``brushlabels`` result carries its mask (``value.rle``).

The format is thi.ng's ``rle-pack``, which Label Studio's editor decodes into the RGBA pixels of an
``original_height`` x ``original_width`` layer (row-major, four bytes a pixel; a pixel is painted where
its alpha is not 0). The bit stream, most significant bit first:

- header: the number of values (32 bits), word size - 1 (5 bits: 7 for bytes), and the four run-length
  field widths - 1 (4 bits each: 3, 4, 8, 16 -> 2, 3, 7, 15);
- then chunks: a repeat flag (1 bit), a width index (2 bits), count - 1 in that many bits, and the
  byte value (one byte for a repeat, ``count`` bytes for a literal chunk);
- zero bits up to the next byte boundary (a whole zero byte when already aligned).

The chunking is the one of ``label_studio_converter.brush.encode_rle`` (the encoder Label Studio's
documentation points to): a run of one value is a one-byte literal, a longer run a repeat chunk in the
narrowest width that holds it, runs longer than 65536 split into 65536-long chunks first. Vectorised
in numpy, because a mask of a few megapixels has thousands of runs and a Python loop per bit would
dominate an export.
"""

from __future__ import annotations

import numpy as np

WIDTHS = (3, 4, 8, 16)
_MAX_RUN = 1 << WIDTHS[-1]
_CODE_BITS = 1 + 2 + WIDTHS[-1] + 8  # the longest chunk of a run: flag, width index, count, value


def _bits(value: int, width: int) -> np.ndarray:
    return (value >> np.arange(width - 1, -1, -1)) & 1


def encode_brush_rle(values: np.ndarray) -> list[int]:
    """``values`` (1-D uint8, e.g. RGBA bytes) -> Label Studio's ``rle`` list of byte values."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    n = values.size
    header = np.concatenate([_bits(n, 32), _bits(8 - 1, 5), *[_bits(w - 1, 4) for w in WIDTHS]])
    if n:
        starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
        runs = np.diff(np.concatenate([starts, [n]]))
        run_values = values[starts].astype(np.int64)
        # runs over 65536 become full 65536-long chunks followed by the rest (1..65536)
        pieces = (runs + _MAX_RUN - 1) // _MAX_RUN
        counts = np.full(int(pieces.sum()), _MAX_RUN, dtype=np.int64)
        last = np.cumsum(pieces) - 1
        counts[last] = runs - (pieces - 1) * _MAX_RUN
        chunk_values = np.repeat(run_values, pieces)
        width_index = np.searchsorted(np.array([1 << w for w in WIDTHS]), counts)  # narrowest width >= count
        widths = np.array(WIDTHS)[width_index]
        repeat = (counts > 1).astype(np.int64)
        code = (
            (repeat << (2 + widths + 8)) | (width_index << (widths + 8)) | ((counts - 1) << 8) | chunk_values
        )  # a single value: flag 0, index 0, count - 1 = 0 in 3 bits, then its byte: the converter's literal
        code_bits = 1 + 2 + widths + 8
        matrix = (code[:, None] >> np.arange(_CODE_BITS - 1, -1, -1)) & 1
        body = matrix[np.arange(_CODE_BITS)[None, :] >= (_CODE_BITS - code_bits)[:, None]]
        bits = np.concatenate([header, body])
    else:
        bits = header
    bits = np.concatenate([bits, np.zeros(8 - bits.size % 8, dtype=bits.dtype)])
    return np.packbits(bits.astype(np.uint8)).tolist()


def mask_to_brush_rle(region: np.ndarray) -> list[int]:
    """A (H, W) bool region -> the ``rle`` of a brush layer painting it (RGBA 255 inside, 0 outside)."""
    return encode_brush_rle(np.repeat(np.where(np.asarray(region, dtype=bool).ravel(), 255, 0).astype(np.uint8), 4))
