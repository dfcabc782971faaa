"""A tiny CMYK ICC profile (v2, printer class, Lab PCS, an 8-bit 2x2x2x2 lookup table) written by hand.

No CMYK profile ships with the test machine and Pillow can only create RGB/Lab/XYZ ones, so the tests
build their own: every CMYK corner maps to the naive ink colour except those in ``overrides``,
which lets a test tell a conversion through the profile from one without it.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np

_D50 = (0.9642, 1.0, 0.8249)
_SRGB_TO_XYZ_D50 = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]]
)


def srgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = _SRGB_TO_XYZ_D50 @ linear / np.asarray(_D50)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return float(116 * f[1] - 16), float(500 * (f[0] - f[1])), float(200 * (f[1] - f[2]))


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def cmyk_profile(overrides: dict[tuple[int, int, int, int], tuple[int, int, int]] | None = None) -> bytes:
    """ICC bytes; ``overrides`` maps a CMYK corner (each 0 or 255) to the sRGB colour it should show."""
    overrides = overrides or {}
    clut = bytearray()
    for corner in itertools.product((0, 255), repeat=4):  # C slowest, K fastest, as ICC orders a CLUT
        c, m, y, k = corner
        rgb = overrides.get(corner, tuple(round((255 - v) * (255 - k) / 255) for v in (c, m, y)))
        L, a, b = srgb_to_lab(rgb)
        clut += bytes([round(L * 255 / 100), round(a) + 128, round(b) + 128])
    identity = bytes(range(256))
    lut = b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0])
    lut += b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1)) + identity * 4 + bytes(clut) + identity * 3
    text = b"test CMYK"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text) + 1) + text + b"\0" + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    wtpt = b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in _D50)
    cprt = b"text" + b"\0" * 4 + b"none\0"
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", lut), (b"cprt", cprt)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += _pad(data)
    size = offset + len(body)
    header = struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"prtrCMYKLab "
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + b"".join(_s15(v) for v in _D50)
    header += b"\0" * (128 - len(header))
    return header + table + body
