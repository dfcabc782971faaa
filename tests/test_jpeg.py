"""The structural JPEG check refuses what a decode refuses, without decoding."""

from __future__ import annotations

import io
import random
import warnings

import pytest
from PIL import Image

from system.data.jpeg import check_jpeg
from system.data.sources.synthetic import render


def _variants() -> list[bytes]:
    """Baseline, progressive, restart-interval, 4:4:4, optimised-table and greyscale files."""
    out = []
    for i in range(4):
        image = Image.open(io.BytesIO(render(i, 6, 96, seed=3)[0]))
        for kwargs in ({}, {"progressive": True}, {"restart_marker_blocks": 2}, {"subsampling": 0},
                       {"optimize": True}):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85, **kwargs)
            out.append(buffer.getvalue())
        buffer = io.BytesIO()
        image.convert("L").save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


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
    rng = random.Random(7)
    damages = [
        lambda d: d[: rng.randrange(1, len(d) - 2)],
        lambda d: (lambda p: d[:p] + rng.randbytes(48) + d[p + 48 :])(rng.randrange(2, len(d) - 48)),
        lambda d: (lambda p: d[:p] + d[p + 200 :])(rng.randrange(2, len(d) - 200)),
        lambda d: (lambda p: d[:p] + bytes([d[p] ^ 0xFF]) + d[p + 1 :])(rng.randrange(2, 700)),
        lambda d: (lambda p: d[:p] + bytes(len(d) - p))(rng.randrange(2, len(d))),
    ]
    variants = _variants()
    refused = 0
    for n in range(600):
        data = damages[n % len(damages)](variants[n % len(variants)])
        if not _decodes(data):
            refused += 1
            assert not _passes(data), f"damage {n % len(damages)} of variant {n % len(variants)} slipped through"
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
    stray_marker = baseline[: scan + 40] + b"\xff\x8b" + baseline[scan + 42 :]
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
