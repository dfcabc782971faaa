"""Both verification levels refuse a PNG whose pixel data falls short of its header, and ``decode``
refuses whatever ``structure`` refuses."""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from system.data.png import check_png
from system.data.sources import BadEntry
from system.data.validate import inspect_image
from tests.test_jpeg import DAMAGES, damaged
from tests.test_jpeg import _variants as jpeg_variants

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
COLOURS = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _scanlines(samples: np.ndarray, depth: int) -> bytes:
    """Filter type 0 rows of an (h, w, channels) array, packed at ``depth`` bits, big-endian."""
    height = samples.shape[0]
    if depth == 16:
        packed = samples.astype(">u2").view(np.uint8).reshape(height, -1)
    elif depth == 8:
        packed = samples.astype(np.uint8).reshape(height, -1)
    else:
        bits = (samples.reshape(height, -1, 1) >> np.arange(depth - 1, -1, -1)) & 1
        packed = np.packbits(bits.reshape(height, -1).astype(np.uint8), axis=1)
    return b"".join(b"\x00" + row.tobytes() for row in packed)


def _pixels(samples: np.ndarray, depth: int, interlaced: bool) -> bytes:
    """The uncompressed image data: one pass, or Adam7's seven (an empty pass has no rows)."""
    if not interlaced:
        return _scanlines(samples, depth)
    passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
    return b"".join(_scanlines(p, depth) for p in passes if p.size)


def _png(
    samples: np.ndarray,
    depth: int,
    colour: int,
    interlaced: bool = False,
    short: int = 0,
    extra: bytes = b"",
    stream: bytes | None = None,
) -> bytes:
    """A well-formed PNG (CRCs right, IEND there) whose inflated IDAT data is ``short`` bytes
    shorter than its header needs, or ``extra`` longer; ``stream`` replaces the zlib stream."""
    height, width = samples.shape[:2]
    raw = _pixels(samples, depth, interlaced)
    if stream is None:
        stream = zlib.compress(raw[: len(raw) - short] + extra)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlaced)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
    if colour == 3:
        out += _chunk(b"PLTE", bytes(i % 256 for i in range(3 << depth)))
    for i in range(0, len(stream), 1000):  # several IDAT chunks, as encoders write them
        out += _chunk(b"IDAT", stream[i : i + 1000])
    return out + _chunk(b"IEND", b"")


KINDS = {  # name: (bit depth, colour type, interlaced, width, height)
    "rgb8": (8, 2, False, 61, 37),
    "palette8": (8, 3, False, 61, 37),
    "palette4": (4, 3, False, 61, 37),
    "rgb16": (16, 2, False, 45, 29),
    "grey_alpha8": (8, 4, False, 61, 37),
    "grey1": (1, 0, False, 61, 37),
    "interlaced_rgb8": (8, 2, True, 61, 37),
    "interlaced_palette2": (2, 3, True, 13, 11),
    "interlaced_rgba16_3x2": (16, 6, True, 3, 2),  # some Adam7 passes are empty
}


def _described(depth: int, colour: int, interlaced: bool, width: int, height: int) -> str:
    return f"{'interlaced ' if interlaced else ''}{width}x{height} {depth}-bit {COLOURS[colour]}"


def _samples(depth: int, colour: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << depth, (height, width, CHANNELS[colour]))


def _expected(samples: np.ndarray, depth: int, colour: int) -> np.ndarray:
    """What Pillow decodes: the samples (16-bit ones cut to their high byte), one channel unstacked."""
    out = samples >> 8 if depth == 16 else samples
    return out[..., 0] if CHANNELS[colour] == 1 else out


@pytest.mark.parametrize("kind", KINDS)
def test_intact_pngs_of_every_kind_pass_both_modes_and_decode_to_their_pixels(kind):
    depth, colour, interlaced, width, height = KINDS[kind]
    samples = _samples(depth, colour, width, height)
    data = _png(samples, depth, colour, interlaced)
    assert check_png(data).describe() == _described(*KINDS[kind])
    for verify in ("structure", "decode"):
        got = inspect_image(data, 10**6, verify)
        assert (got.ext, got.data, got.width, got.height, got.converted) == ("png", data, width, height, ())
    decoded = np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)  # a 1-bit image decodes to booleans
    np.testing.assert_array_equal(decoded, _expected(samples, depth, colour))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("short", [1, 500])
def test_pngs_whose_pixel_data_falls_short_of_their_header_are_refused_by_both_modes(kind, short):
    depth, colour, interlaced, width, height = KINDS[kind]
    samples = _samples(depth, colour, width, height)
    needed = len(_pixels(samples, depth, interlaced))
    short = min(short, needed - 1)
    data = _png(samples, depth, colour, interlaced, short=short)
    described = _described(*KINDS[kind])
    for verify in ("structure", "decode"):
        with pytest.raises(BadEntry) as info:
            inspect_image(data, 10**6, verify)
        assert info.value.code == "corrupt"
        assert str(info.value) == (
            f"corrupt or truncated image (png: IDAT data is {short:,} bytes short of the "
            f"{needed:,} the {described} header needs)"
        )


def test_a_decode_alone_misses_a_bad_idat_crc_that_both_modes_now_refuse():
    data = bytearray(_png(_samples(8, 2, 40, 30), 8, 2))
    at = data.index(b"IDAT") + 4 + 1000  # the first IDAT's CRC
    data[at] ^= 0x55
    Image.open(io.BytesIO(bytes(data))).load()  # Pillow checks no CRC while decoding
    for verify in ("structure", "decode"):
        with pytest.raises(BadEntry, match=r"png: IDAT chunk at byte \d+ fails its CRC"):
            inspect_image(bytes(data), 10**6, verify)


def test_malformed_pixel_streams_are_refused_with_what_is_wrong():
    samples = _samples(8, 2, 40, 30)
    raw = _pixels(samples, 8, False)
    unfinished = zlib.compressobj()
    unfinished = unfinished.compress(raw) + unfinished.flush(zlib.Z_SYNC_FLUSH)
    bad_filter = bytearray(raw)
    bad_filter[121 * 7] = 9  # the eighth row's filter byte
    intact = _png(samples, 8, 2)
    head, stream = intact[: intact.index(b"IDAT") - 4], zlib.compress(raw)
    split = head + _chunk(b"IDAT", stream[:100]) + _chunk(b"tEXt", b"a\x00b") + _chunk(b"IDAT", stream[100:])
    palette = _png(samples[..., :1], 8, 3)
    plte = palette.index(b"PLTE") - 4
    cases = {
        "inflates to more than the 3,630 bytes the 40x30 8-bit RGB header needs": _png(samples, 8, 2, extra=b"\x00"),
        "IDAT zlib stream is unfinished": _png(samples, 8, 2, stream=unfinished),
        "7 bytes after the end of its zlib stream": _png(samples, 8, 2, stream=zlib.compress(raw) + b"garbage"),
        "does not inflate": _png(samples, 8, 2, stream=b"\x78\x9c\xff\xff\xff"),  # reserved block type
        "a row with filter type 9": _png(samples, 8, 2, stream=zlib.compress(bytes(bad_filter))),
        "no IEND chunk": intact[:-12],
        "IDAT chunks are not consecutive": split + _chunk(b"IEND", b""),
        "palette image without a PLTE chunk": palette[:plte] + palette[plte + 12 + 768 :],
    }
    for reason, data in cases.items():
        with pytest.raises(ValueError, match=reason):
            check_png(data)
        with pytest.raises(BadEntry, match=reason):
            inspect_image(data, 10**6, "decode")


def test_a_decompression_bomb_is_refused_without_inflating_it():
    """A 100x100 greyscale header over a stream that inflates to 256 MiB: the inflater stops one
    byte past the 10,100 the header needs."""
    bomb = zlib.compressobj(9)
    stream = b"".join(bomb.compress(bytes(1 << 20)) for _ in range(256)) + bomb.flush()
    data = _png(_samples(8, 0, 100, 100), 8, 0, stream=stream)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="inflates to more than the 10,100 bytes"):
            check_png(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _png_files() -> list[bytes]:
    files = []
    for depth, colour, interlaced, width, height in KINDS.values():
        files.append(_png(_samples(depth, colour, width, height), depth, colour, interlaced))
    rgb = (np.random.default_rng(5).random((48, 64, 3)) * 255).astype(np.uint8)
    for mode in ("RGB", "RGBA", "P", "L"):
        out = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(out, "PNG")
        files.append(out.getvalue())
    return [data for data in files if len(data) > 700]  # room for every damage


def _cut_idat(rng: random.Random, data: bytes) -> bytes:
    """The IDAT stream cut short and re-made into one chunk with a right CRC: a well-formed file."""
    start, end = data.index(b"IDAT") - 4, data.index(b"IEND") - 4
    stream = b"".join(_idat_bodies(data[start:end]))
    return data[:start] + _chunk(b"IDAT", stream[: rng.randrange(len(stream))]) + data[end:]


def _idat_bodies(chunks: bytes):
    pos = 0
    while pos < len(chunks):
        length = int.from_bytes(chunks[pos : pos + 4], "big")
        yield chunks[pos + 8 : pos + 8 + length]
        pos += 12 + length


def _verdict(data: bytes, verify: str) -> str | None:
    try:
        inspect_image(data, 10**6, verify)
        return None
    except BadEntry as exc:
        return str(exc)


def test_decode_refuses_every_damaged_file_that_structure_refuses():
    files = damaged(_png_files(), 200, seed=11, damages=(*DAMAGES, _cut_idat)) + damaged(jpeg_variants(), 200)
    refused = 0
    for label, data in files:
        structure, decode = _verdict(data, "structure"), _verdict(data, "decode")
        if structure is not None:
            refused += 1
            assert decode is not None, f"{label}: decode passes what structure refuses ({structure})"
    assert refused > 250
