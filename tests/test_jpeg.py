"""The structural JPEG check refuses what a decode refuses, without decoding."""

from __future__ import annotations

import io
import random
import re
import warnings

import pytest
from PIL import Image

from system.data.jpeg import check_jpeg
from system.data.sources import BadEntry
from system.data.sources.synthetic import render
from system.data.validate import inspect_image


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def _variants() -> list[bytes]:
    """Baseline, progressive, restart-interval (sequential and progressive, 4:2:0, 4:2:2, greyscale,
    a size that is no multiple of the MCU), 4:4:4, optimised-table and greyscale files."""
    out = []
    for i in range(4):
        image = Image.open(io.BytesIO(render(i, 6, 96, seed=3)[0]))
        for kwargs in (
            {},
            {"progressive": True},
            {"restart_marker_blocks": 2},
            {"subsampling": 0},
            {"optimize": True},
            {"progressive": True, "restart_marker_blocks": 3},
        ):
            out.append(_jpeg(image, quality=85, **kwargs))
        out.append(_jpeg(image.convert("L")))
        odd = image.resize((91 - 10 * i, 53 + 7 * i))
        out.append(_jpeg(odd, subsampling=1, restart_marker_rows=1))
        out.append(_jpeg(odd.convert("L"), progressive=True, restart_marker_blocks=5))
    return out


DAMAGES = (
    lambda rng, d: d[: rng.randrange(1, len(d) - 2)],
    lambda rng, d: (lambda p: d[:p] + rng.randbytes(48) + d[p + 48 :])(rng.randrange(2, len(d) - 48)),
    lambda rng, d: (lambda p: d[:p] + d[p + 200 :])(rng.randrange(2, len(d) - 200)),
    lambda rng, d: (lambda p: d[:p] + bytes([d[p] ^ 0xFF]) + d[p + 1 :])(rng.randrange(2, 700)),
    lambda rng, d: (lambda p: d[:p] + bytes(len(d) - p))(rng.randrange(2, len(d))),
)
"""Truncation, an overwritten run, a deleted run, a flipped byte among the headers, a zeroed tail."""


def damaged(files: list[bytes], count: int, seed: int = 7, damages=DAMAGES) -> list[tuple[str, bytes]]:
    """``count`` damaged copies of ``files`` (each ``damage(rng, data)``), labelled for messages."""
    rng = random.Random(seed)
    return [
        (f"damage {n % len(damages)} of file {n % len(files)}", damages[n % len(damages)](rng, files[n % len(files)]))
        for n in range(count)
    ]


def _decodes(data: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            Image.open(io.BytesIO(data)).load()
            return True
        except (OSError, SyntaxError, ValueError):
            return False


def _passes(data: bytes) -> bool:
    try:
        check_jpeg(data)
        return True
    except ValueError:
        return False


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of the segments before the first scan."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.append((data[pos + 1], pos, end))
        pos = end
    return out


def test_every_variant_passes():
    for data in _variants():
        assert _decodes(data) and _passes(data)
        assert _passes(data + b"\x00camera data after EOI\xff\xd8")


def test_refuses_whatever_a_decode_refuses():
    refused = 0
    for label, data in damaged(_variants(), 600):
        if not _decodes(data):
            refused += 1
            assert not _passes(data), f"{label} slipped through"
    assert refused > 150  # the damages do hit what libjpeg refuses


def test_named_faults():
    baseline, progressive = _variants()[:2]
    dht = [(start, end) for marker, start, end in _segments(progressive) if marker == 0xC4]
    without_table = progressive[: dht[0][0]] + progressive[dht[0][1] :]
    bad_counts = bytearray(baseline)
    start = next(s for marker, s, _ in _segments(baseline) if marker == 0xC4)
    assert bad_counts[start + 5 : start + 8] == b"\x00\x01\x05"  # the standard DC table's code lengths
    bad_counts[start + 5 : start + 7] = b"\x01\x00"  # as many symbols, but 1 + 0 + 5 codes overflow 3 bits
    scan = baseline.index(b"\xff\xda")
    stray_marker = baseline[: scan + 400] + b"\xff\x8b" + baseline[scan + 402 :]
    no_scan = baseline[:scan] + b"\xff\xd9"
    cases = {
        "Huffman table DC 0 is used but not defined": without_table,
        "more codes than its code lengths allow": bytes(bad_counts),
        "unknown or unsupported marker 0x8b": stray_marker,
        "no image scan": no_scan,
        "no end-of-image marker": baseline[:-2],
        "not a JPEG": b"GIF89a" + baseline,
    }
    for reason, data in cases.items():
        with pytest.raises(ValueError, match=reason):
            check_jpeg(data)


def test_sequential_file_without_huffman_tables_uses_the_standard_ones():
    """Motion-JPEG frames leave the tables out; libjpeg-turbo decodes them with the standard tables
    (which Pillow writes unless asked to optimise)."""
    baseline = _variants()[0]
    data = baseline
    for marker, start, end in reversed(_segments(baseline)):
        if marker == 0xC4:
            data = data[:start] + data[end:]
    assert b"\xff\xc4" not in data[: data.index(b"\xff\xda")]
    assert _decodes(data) and _passes(data)


def _refused_by_both_modes(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_jpeg(data)
    for verify in ("structure", "decode"):
        with pytest.raises(BadEntry, match=reason) as info:
            inspect_image(data, 10**6, verify)
        assert info.value.code == "corrupt"


def test_restart_markers_must_be_exactly_where_the_restart_interval_puts_them():
    """libjpeg only warns at a missing, extra or misnumbered restart marker (the rest of the scan
    lands in the wrong place), so a decode alone passes these files."""
    data = _variants()[2]  # 96x96 at 4:2:0: 36 MCUs, a restart every 2
    restarts = [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", data)]
    assert len(restarts) == 17
    missing = data[: restarts[5]] + data[restarts[5] + 2 :]
    extra = data[:-2] + bytes([0xFF, 0xD0 + 17 % 8]) + data[-2:]  # the next in turn, after the last MCU
    misnumbered = data[: restarts[5] + 1] + b"\xd7" + data[restarts[5] + 2 :]
    assert _decodes(missing) and _decodes(extra) and _decodes(misnumbered)
    _refused_by_both_modes(missing, "scan 1 has 16 restart markers where its 36 MCUs at an interval of 2 need 17")
    _refused_by_both_modes(extra, "scan 1 has 18 restart markers where its 36 MCUs at an interval of 2 need 17")
    _refused_by_both_modes(misnumbered, "scan 1 has its restart markers out of order")
    progressive = _variants()[5]  # a restart every 3 MCUs; the last scan is a non-interleaved AC scan of 12x12 blocks
    last = progressive.rindex(b"\xff\xda")
    cut = progressive.index(b"\xff\xd0", last)
    scans = progressive.count(b"\xff\xda")
    _refused_by_both_modes(
        progressive[:cut] + progressive[cut + 2 :],
        f"scan {scans} has 46 restart markers where its 144 MCUs at an interval of 3 need 47",
    )


def test_a_scan_cut_to_a_stub_is_refused():
    """Cut after a few bytes and closed with EOI, the file has all its markers; libjpeg decodes it
    with a warning (grey from there on). Each block needs a DC and an AC Huffman code (2+ bits each
    in the standard tables): 216 blocks need 108 bytes."""
    for data, reason in (
        (_variants()[0], "scan 1 holds 6 bytes of entropy-coded data where its 216 blocks need at least 108"),
        (_variants()[1], "scan 1 holds 6 bytes of entropy-coded data where its 216 blocks need"),
    ):
        sos = data.index(b"\xff\xda")
        stub = data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big") + 6] + b"\xff\xd9"
        assert _decodes(stub)
        _refused_by_both_modes(stub, reason)
