"""A structural check of a PNG file, its pixel data's size included, without unfiltering it.

A chunk CRC walk (what Pillow's ``verify()`` does) passes a file whose chunks were re-made around a
cut: the header promises more pixels than the compressed stream holds, and the image fails only when
training decodes it. So this also inflates the IDAT stream and holds it to the exact size the header
needs (each row a filter byte plus its packed samples; Adam7 passes counted separately), refusing
a short stream, a longer one (the inflater is capped there, so a decompression bomb costs no memory),
an unfinished zlib stream, bytes after its end, and filter types other than 0-4. The inflated data
is counted in bounded pieces and never kept; rows are not unfiltered (no fault that a decoder
refuses lives there). Inflating is the bulk of a PNG decode's work, so unlike the JPEG walk this
check costs close to a decode; PNGs are the minority of inputs.

Where decoders only warn or ignore, so does this: unknown ancillary or critical chunks (Pillow
skips them), bytes after IEND, APNG frame data (``fdAT``: CRC-checked only, the default image is
what a decoder shows).
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
_COLOURS = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PIECE = 1 << 20  # most inflated bytes held at once


class PngHeader(NamedTuple):
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool

    def describe(self) -> str:
        kind = f"{self.width}x{self.height} {self.bit_depth}-bit {_COLOURS[self.colour_type]}"
        return f"interlaced {kind}" if self.interlaced else kind

    def rows(self) -> list[tuple[int, int]]:
        """(row length with its filter byte, row count) of each pass in stream order."""
        bits = _CHANNELS[self.colour_type] * self.bit_depth
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        out = []
        for x0, y0, dx, dy in passes:
            width, height = max(0, -(-(self.width - x0) // dx)), max(0, -(-(self.height - y0) // dy))
            if width and height:
                out.append((1 + -(-width * bits // 8), height))
        return out


def _header(body: bytes) -> PngHeader:
    if len(body) != 13:
        raise ValueError(f"IHDR chunk is {len(body)} bytes, not 13")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if not (0 < width < 1 << 31 and 0 < height < 1 << 31):
        raise ValueError(f"IHDR gives the size {width}x{height}")
    if depth not in _DEPTHS.get(colour, ()):
        raise ValueError(f"IHDR gives colour type {colour} with bit depth {depth}, which PNG does not define")
    if compression or filtering or interlace > 1:
        raise ValueError(f"IHDR gives compression {compression}, filter method {filtering}, interlace {interlace}")
    return PngHeader(width, height, depth, colour, bool(interlace))


class _Pixels:
    """The IDAT stream, inflated piece by piece and held to the size the header needs."""

    def __init__(self, header: PngHeader):
        self.header = header
        self.rows = []
        start = 0
        for length, count in header.rows():
            self.rows.append((start, length, count))
            start += length * count
        self.needed = start
        self.inflater = zlib.decompressobj()
        self.produced = 0

    def feed(self, chunk: memoryview) -> None:
        if self.inflater.eof:
            if len(chunk):
                raise ValueError(f"IDAT holds {len(chunk):,} bytes after the end of its zlib stream")
            return
        data: bytes | memoryview = chunk
        while True:
            cap = min(_PIECE, self.needed - self.produced + 1)
            try:
                out = self.inflater.decompress(data, cap)
            except zlib.error as exc:
                raise ValueError(f"IDAT data does not inflate ({exc})") from None
            self._check_filters(out)
            self.produced += len(out)
            if self.produced > self.needed:
                raise ValueError(
                    f"IDAT data inflates to more than the {self.needed:,} bytes "
                    f"the {self.header.describe()} header needs"
                )
            data = self.inflater.unconsumed_tail
            if not data and len(out) < cap:
                break
        if self.inflater.unused_data:
            raise ValueError(f"IDAT holds {len(self.inflater.unused_data):,} bytes after the end of its zlib stream")

    def _check_filters(self, out: bytes) -> None:
        """Each row's first byte names its filter: 0-4 are the only ones defined."""
        begin, end = self.produced, self.produced + len(out)
        for start, length, count in self.rows:
            stop = min(end, start + length * count)
            if stop <= begin:
                continue
            if start >= end:
                break
            first = start + max(0, -(-(begin - start) // length)) * length
            if first < stop:
                worst = max(out[first - begin : stop - begin : length])
                if worst > 4:
                    raise ValueError(f"IDAT data has a row with filter type {worst} (PNG defines 0-4)")

    def finish(self) -> None:
        if self.produced < self.needed:
            raise ValueError(
                f"IDAT data is {self.needed - self.produced:,} bytes short of the {self.needed:,} "
                f"the {self.header.describe()} header needs"
            )
        if not self.inflater.eof:
            raise ValueError("IDAT zlib stream is unfinished (its end and checksum are missing)")


def check_png(data: bytes) -> PngHeader:
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG (no PNG signature)")
    view = memoryview(data)
    header: PngHeader | None = None
    pixels: _Pixels | None = None
    palette = False
    idat = "before"  # before, in or after the run of IDAT chunks
    pos = len(_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ValueError("image file is truncated (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1")
        if not kind.isalpha():
            raise ValueError(f"chunk at byte {pos} has the type {kind!r}, not four letters")
        if length >= 1 << 31 or pos + 12 + length > len(data):
            raise ValueError(f"{name} chunk at byte {pos} overruns the file ({length:,} bytes)")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(view[pos + 4 : pos + 8 + length]) != crc:
            raise ValueError(f"{name} chunk at byte {pos} fails its CRC")
        body = view[pos + 8 : pos + 8 + length]
        if header is None:
            if kind != b"IHDR":
                raise ValueError(f"the first chunk is {name}, not IHDR")
            header = _header(bytes(body))
            pixels = _Pixels(header)
        elif kind == b"IHDR":
            raise ValueError(f"a second IHDR chunk at byte {pos}")
        elif kind == b"PLTE":
            if idat != "before":
                raise ValueError("PLTE chunk after the image data")
            if not length or length % 3 or length > 768:
                raise ValueError(f"PLTE chunk of {length} bytes (1-256 RGB entries)")
            palette = True
        elif kind == b"IDAT":
            if idat == "after":
                raise ValueError(f"IDAT chunks are not consecutive (another one at byte {pos})")
            if header.colour_type == 3 and not palette:
                raise ValueError("palette image without a PLTE chunk before its image data")
            pixels.feed(body)
            idat = "in"
        elif kind == b"IEND":
            if idat == "before":
                raise ValueError("the file has no IDAT chunk before IEND")
            pixels.finish()
            return header
        if kind != b"IDAT" and idat == "in":
            idat = "after"
        pos += 12 + length
