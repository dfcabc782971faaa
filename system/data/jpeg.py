"""A structural check of a JPEG file: what makes libjpeg refuse it, found without decoding.

Decoding a JPEG to verify it costs more than copying it into a shard (Huffman decoding dominates,
even at libjpeg's 1/8 DCT scale), yet libjpeg refuses a file for its structure, never its pixels: a
bit error inside the entropy-coded data is decoded with a warning. What makes a decode fail is the
marker layout - truncation, an unknown marker (inside the entropy data too, where random damage
puts most of them), a segment that overruns the file, an impossible Huffman or quantisation table,
a frame or scan header that contradicts itself, a scan that names an undefined component or
table. This walks that layout with libjpeg(-turbo)'s own rules: every marker through EOI, the
entropy-coded data searched for the first byte pair that is not stuffing, restart or fill. Where
libjpeg only warns, so (but for the two checks below) does nothing here: stray bytes between
segments are skipped, bytes after EOI
are allowed (cameras append data there), and a sequential file may omit Huffman tables 0 and 1
(libjpeg-turbo then uses the standard ones, as Motion-JPEG frames expect).

Two checks go beyond libjpeg, which only warns and then fills the image with grey or misplaced
blocks: with a restart interval, each scan of a Huffman-coded DCT frame must hold exactly the
restart markers the interval puts between its MCUs (ceil(MCUs / interval) - 1, numbered 0-7 in
turn); and each scan must hold at least the bits its blocks cannot do without (a DC code and an AC
code per block in a sequential scan, at the shortest code length of the tables it uses; a DC code or
a refinement bit per block in a progressive DC scan), so a scan cut to a stub and closed with EOI is
refused.

The frame header it reads anyway gives the size and colour layout, so ingest needs no other
parser for a JPEG; Huffman tables are checked once per distinct table (most encoders write the same
few).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import numpy as np

_EOI, _SOS, _DHT, _DQT, _DRI = 0xD9, 0xDA, 0xC4, 0xDB, 0xDD
_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3}
_FRAMES = _HUFFMAN_FRAMES | {0xC9, 0xCA, 0xCB}
_PROGRESSIVE = {0xC2, 0xCA}
_LOSSLESS = {0xC3, 0xCB}
_DCT_HUFFMAN = _HUFFMAN_FRAMES - _LOSSLESS
_SKIPPED = {0xCC, 0xDC, 0xFE, *range(0xE0, 0xF0)}  # arithmetic conditioning, DNL, comment, APPn
_SEGMENTS = _FRAMES | _SKIPPED | {_SOS, _DHT, _DQT, _DRI}


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int
    precision: int


class _Table(NamedTuple):
    largest: int  # symbol
    shortest: int  # code length in bits


_STANDARD = _Table(11, 2)  # what libjpeg-turbo uses for a missing table 0 or 1: symbols 0-11 (DC), codes of 2+ bits


@functools.lru_cache(maxsize=256)
def _huffman_tables(body: bytes) -> tuple[tuple[tuple[int, int], _Table], ...]:
    """((class, slot), table) of each table in a DHT segment."""
    tables = []
    pos = 0
    while pos < len(body):
        if pos + 17 > len(body):
            raise ValueError("Huffman table segment is cut short")
        kind, slot = body[pos] >> 4, body[pos] & 15
        if kind > 1 or slot > 3:
            raise ValueError(f"Huffman table has class {kind} / slot {slot}")
        counts = body[pos + 1 : pos + 17]
        total = sum(counts)
        if total > 256 or pos + 17 + total > len(body):
            raise ValueError("Huffman table has more symbols than its segment holds")
        code = 0
        for length, count in enumerate(counts, start=1):  # canonical codes must fit their lengths
            code += count
            if code >= 1 << length:
                raise ValueError("Huffman table has more codes than its code lengths allow")
            code <<= 1
        shortest = next((length for length, count in enumerate(counts, start=1) if count), 16)
        tables.append(((kind, slot), _Table(max(body[pos + 17 : pos + 17 + total], default=0), shortest)))
        pos += 17 + total
    return tuple(tables)


def _quant_tables(body: bytes, defined: set[int]) -> None:
    pos = 0
    while pos < len(body):
        precision, slot = body[pos] >> 4, body[pos] & 15
        if precision > 1 or slot > 3:
            raise ValueError(f"quantisation table has precision {precision} / slot {slot}")
        pos += 1 + 64 * (precision + 1)
        if pos > len(body):
            raise ValueError("quantisation table segment is cut short")
        defined.add(slot)


class _Component(NamedTuple):
    quant: int  # table slot
    across: int  # sampling factors
    down: int


def _frame(body: bytes) -> tuple[JpegFrame, dict[int, _Component]]:
    """The frame and its components by id."""
    if len(body) < 6 or len(body) != 6 + 3 * body[5]:
        raise ValueError("frame header has the wrong length for its component count")
    height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
    if body[0] not in (8, 12, 16) or width == 0 or height == 0 or not 1 <= count <= 4:
        raise ValueError(f"frame header: precision {body[0]}, {width}x{height}, {count} components")
    components = {}
    for i in range(count):
        ident, sampling, slot = body[6 + 3 * i : 9 + 3 * i]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4) or slot > 3 or ident in components:
            raise ValueError(f"frame component {ident}: sampling {sampling:#04x}, quantisation slot {slot}")
        components[ident] = _Component(slot, sampling >> 4, sampling & 15)
    return JpegFrame(width, height, count, body[0]), components


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class _ScanSize(NamedTuple):
    """What a scan's entropy-coded data must hold: its MCU count (restart markers split it) and a
    lower bound on its bits."""

    mcus: int
    blocks: int
    least_bits: int


def _scan(
    body: bytes,
    sof: int,
    frame: JpegFrame,
    components: dict[int, _Component],
    quant: set[int],
    huffman: dict[tuple[int, int], _Table],
) -> _ScanSize:
    count = body[0] if body else 0
    if not 1 <= count <= 4 or len(body) != 4 + 2 * count:
        raise ValueError("scan header has the wrong length for its component count")
    start, end, high, low = body[1 + 2 * count], body[2 + 2 * count], body[3 + 2 * count] >> 4, body[3 + 2 * count] & 15
    if sof in _PROGRESSIVE:
        dc = start == 0
        if (end != 0 if dc else (start > end or end > 63 or count != 1)) or (high and low != high - 1) or low > 13:
            raise ValueError(f"progressive scan parameters Ss={start} Se={end} Ah={high} Al={low}")
    needs_dc = sof not in _PROGRESSIVE or (start == 0 and high == 0)
    needs_ac = sof not in _PROGRESSIVE and sof not in _LOSSLESS or start > 0
    seen = []
    least_bits_per_mcu = 0
    across, down = max(c.across for c in components.values()), max(c.down for c in components.values())
    for i in range(count):
        ident, slots = body[1 + 2 * i], body[2 + 2 * i]
        if ident not in components or ident in seen:
            raise ValueError(f"scan names component {ident} that the frame lacks or the scan repeats")
        seen.append(ident)
        component = components[ident]
        if component.quant not in quant:
            raise ValueError(f"quantisation table {component.quant} is used but not defined")
        if sof not in _HUFFMAN_FRAMES:
            continue
        least_bits = 0  # per block: a DC code and an AC code (an EOB at least) in a sequential scan
        for needed, kind, slot in ((needs_dc, 0, slots >> 4), (needs_ac, 1, slots & 15)):
            if not needed:
                continue
            if (kind, slot) not in huffman and (slot > 1 or sof in _PROGRESSIVE):
                raise ValueError(f"Huffman table {'AC' if kind else 'DC'} {slot} is used but not defined")
            table = huffman.get((kind, slot), _STANDARD)
            if kind == 0 and sof not in _LOSSLESS and table.largest > 15:
                raise ValueError(f"DC Huffman table {slot} has a symbol above 15")
            if kind == 0 or sof not in _PROGRESSIVE:  # a progressive AC scan's EOB runs span blocks
                least_bits += table.shortest
        if sof in _PROGRESSIVE and start == 0 and high:
            least_bits = 1  # a DC refinement: one bit per block
        blocks_per_mcu = 1 if count == 1 else component.across * component.down
        least_bits_per_mcu += blocks_per_mcu * (0 if sof in _LOSSLESS else least_bits)
    if count == 1:  # a non-interleaved scan: one block per MCU, over the component's own extent
        only = components[seen[0]]
        mcus = _ceil(_ceil(frame.width * only.across, across), 8) * _ceil(_ceil(frame.height * only.down, down), 8)
        blocks = mcus
    else:
        mcus = _ceil(frame.width, 8 * across) * _ceil(frame.height, 8 * down)
        blocks = mcus * sum(components[ident].across * components[ident].down for ident in seen)
    return _ScanSize(mcus, blocks, mcus * least_bits_per_mcu)


# 0xFF followed by anything but stuffing (00), TEM (01), a restart (D0-D7) or fill (FF): a marker
_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")


_RESTART_CYCLE = bytes(range(0xD0, 0xD8))


def _next_marker(data: bytes, pos: int) -> int:
    """Offset of the 0xFF of the next marker at or after ``pos``, passing over entropy-coded data
    (stuffed 0xFF00, restarts, fill bytes) or stray bytes (a C-speed search: most files' scans are
    their bulk)."""
    found = _MARKER.search(data, pos)
    if found is None:
        raise ValueError("image file is truncated (no end-of-image marker)")
    return found.start()


def _restart_numbers(data: bytes, start: int, end: int) -> bytes:
    """The second bytes of the restart markers in ``data[start:end]``, entropy-coded data, where 0xFF
    starts only stuffing (FF00), fill (FFFF) or a restart (vectorised: a regex search here costs
    several times the marker walk)."""
    region = np.frombuffer(data, np.uint8, end - start, start)
    after = region[np.flatnonzero(region[:-1] == 0xFF) + 1]
    return after[(after >= 0xD0) & (after <= 0xD7)].tobytes()


def _check_entropy_data(data: bytes, start: int, end: int, scan: int, size: _ScanSize, interval: int) -> None:
    """With a restart interval, libjpeg resynchronises at a missing or extra restart marker with
    only a warning, leaving the rest of the scan misplaced: the markers must be exactly those the
    interval puts between the scan's MCUs, numbered 0-7 in turn. And every block needs some bits."""
    restarts = 0
    if interval:
        found = _restart_numbers(data, start, end)
        restarts, needed = len(found), _ceil(size.mcus, interval) - 1
        if restarts != needed:
            raise ValueError(
                f"scan {scan} has {restarts:,} restart markers where its {size.mcus:,} MCUs "
                f"at an interval of {interval:,} need {needed:,}"
            )
        if found != (_RESTART_CYCLE * _ceil(restarts, 8))[:restarts]:
            raise ValueError(f"scan {scan} has its restart markers out of order")
    coded = end - start - 2 * restarts
    if coded * 8 < size.least_bits:
        raise ValueError(
            f"scan {scan} holds {coded:,} bytes of entropy-coded data where its {size.blocks:,} "
            f"blocks need at least {_ceil(size.least_bits, 8):,}"
        )


def check_jpeg(data: bytes) -> JpegFrame:
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    sof: int | None = None  # the frame's marker: its coding process
    frame: JpegFrame | None = None
    scans = 0
    components: dict[int, _Component] = {}
    quant: set[int] = set()
    huffman: dict[tuple[int, int], _Table] = {}
    interval = 0
    pos = 2
    while True:
        pos = _next_marker(data, pos)
        marker = data[pos + 1]
        if marker == _EOI:
            if not scans:
                raise ValueError("the file has no image scan before its end-of-image marker")
            return frame
        if marker not in _SEGMENTS:
            raise ValueError(f"unknown or unsupported marker {marker:#04x} at byte {pos}")
        if pos + 4 > len(data):
            raise ValueError("image file is truncated (segment length missing)")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise ValueError(f"segment {marker:#04x} at byte {pos} overruns the file ({length} bytes)")
        body = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if marker == _DHT:
            huffman.update(_huffman_tables(body))
        elif marker == _DQT:
            _quant_tables(body, quant)
        elif marker == _DRI:
            if length != 4:
                raise ValueError("restart interval segment has the wrong length")
            interval = int.from_bytes(body, "big")
        elif marker in _FRAMES:
            if sof is not None:
                raise ValueError("a second frame header")
            sof, (frame, components) = marker, _frame(body)
        elif marker == _SOS:
            if sof is None:
                raise ValueError("scan before the frame header")
            scans += 1
            size = _scan(body, sof, frame, components, quant, huffman)
            end = _next_marker(data, pos)
            _check_entropy_data(data, pos, end, scans, size, interval if sof in _DCT_HUFFMAN else 0)
            pos = end
