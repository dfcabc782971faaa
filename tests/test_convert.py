"""CMYK, 16-bit and EXIF-oriented images are kept with their real colours and the right way up."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from system.data.convert import gt_upright, mask_upright
from system.data.sources import BadEntry, Entry, Loaded
from system.data.transforms import decode_normalised, decode_rgb, to_rgb
from system.data.validate import inspect_image, sample_members
from tests.icc import cmyk_profile

RED_INK = (0, 255, 255, 0)
PROFILE_RED = (180, 40, 60)  # what the test profile says full magenta + yellow ink looks like


def _cmyk_jpeg(ink: tuple[int, int, int, int], icc: bytes | None = None) -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (32, 24), ink).save(out, format="JPEG", quality=95, **({"icc_profile": icc} if icc else {}))
    return out.getvalue()


def _stored_colour(data: bytes) -> tuple[int, ...]:
    inspected = inspect_image(data, 10**6)
    image = Image.open(io.BytesIO(inspected.data))
    assert image.mode in ("L", "RGB") and (inspected.width, inspected.height) == image.size
    return tuple(np.asarray(image.convert("RGB"), dtype=np.int64)[12, 16])


@pytest.mark.parametrize(
    "ink,rgb",
    [(RED_INK, (255, 0, 0)), ((40, 100, 200, 30), (190, 137, 49)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_a_cmyk_jpeg_without_a_profile_keeps_its_ink_colour(ink, rgb):
    data = _cmyk_jpeg(ink)
    assert inspect_image(data, 10**6).converted == ("cmyk->rgb",)
    np.testing.assert_allclose(_stored_colour(data), rgb, atol=4)


def test_a_cmyk_jpeg_with_a_profile_is_converted_through_the_profile():
    icc = cmyk_profile({RED_INK: PROFILE_RED})
    data = _cmyk_jpeg(RED_INK, icc)
    assert inspect_image(data, 10**6).converted == ("cmyk->rgb(icc)",)
    np.testing.assert_allclose(_stored_colour(data), PROFILE_RED, atol=4)
    np.testing.assert_allclose(_stored_colour(_cmyk_jpeg((0, 0, 0, 0), icc)), (255, 255, 255), atol=3)


def test_a_damaged_profile_falls_back_to_the_ink_formula():
    data = _cmyk_jpeg(RED_INK, b"not an ICC profile at all" * 8)
    assert inspect_image(data, 10**6).converted == ("cmyk->rgb",)
    np.testing.assert_allclose(_stored_colour(data), (255, 0, 0), atol=4)


def test_a_16_bit_png_is_scaled_by_its_full_range_not_clipped():
    grey = np.full((24, 32), 51400, np.uint16)  # 200 / 255 of the 16-bit range
    grey[0, 0] = 65535
    out = io.BytesIO()
    Image.fromarray(grey).save(out, format="PNG")
    assert Image.open(io.BytesIO(out.getvalue())).convert("L").getpixel((5, 5)) == 255, "Pillow alone clips"
    inspected = inspect_image(out.getvalue(), 10**6)
    assert (inspected.ext, inspected.converted) == ("png", ("i16->l",))
    stored = np.asarray(Image.open(io.BytesIO(inspected.data)))
    assert stored[5, 5] == 200 and stored[0, 0] == 255
    assert np.asarray(decode_rgb(out.getvalue()))[5, 5].tolist() == [200, 200, 200], "the stream converts alike"


def test_float_images_use_zero_to_one_or_their_own_range():
    cases = (([0.0, 0.5, 1.0], [0, 128, 255], "f(0..1)->l"), ([-2.0, 0.0, 2.0], [0, 128, 255], "f(min..max)->l"))
    for values, expected, step in cases:
        out = io.BytesIO()
        Image.fromarray(np.array([values], np.float32)).save(out, format="TIFF")
        inspected = inspect_image(out.getvalue(), 10**6)
        assert inspected.converted == (step,)
        assert np.asarray(Image.open(io.BytesIO(inspected.data))).ravel().tolist() == expected


def _rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A 40x20 landscape JPEG stored sideways: its EXIF orientation 6 says turn 90 degrees clockwise."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:8, :8] = (255, 255, 255)  # a white block in the stored top-left corner
    mask = np.zeros((20, 40), np.uint8)
    mask[:8, :8] = 1
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue(), mask


def test_an_exif_rotated_jpeg_is_stored_upright_with_its_mask_turned_the_same_way():
    data, mask = _rotated_jpeg()
    members, has_mask, _ = sample_members(Entry("r", "r.jpg", ("a",)), Loaded(data, mask, ("a",)), {"a": 0}, 10**6)
    stored = dict(members)
    meta = json.loads(stored["json"])
    assert has_mask and meta["converted"] == ["exif:rotate90"] and (meta["width"], meta["height"]) == (20, 40)
    image = Image.open(io.BytesIO(stored["jpg"]))
    assert image.size == (20, 40) and not image.getexif().get(0x0112, 1) > 1
    upright = np.asarray(image.convert("L"))
    turned = np.asarray(Image.open(io.BytesIO(stored["mask.png"])))
    assert upright[:8, -8:].mean() > 240 and upright[-8:, :8].mean() < 15, "the block is now top-right"
    np.testing.assert_array_equal(turned == 1, upright > 128)


def test_a_mask_already_in_the_upright_frame_is_left_as_it_is():
    data, mask = _rotated_jpeg()
    done = decode_normalised(data, upright=True)
    assert done.converted == ("exif:rotate90",) and done.image.size == (20, 40)
    upright_mask = np.ascontiguousarray(np.rot90(mask, -1))
    assert mask_upright(upright_mask, done) is upright_mask
    np.testing.assert_array_equal(mask_upright(mask, done), upright_mask)
    np.testing.assert_array_equal(gt_upright(mask, data), upright_mask), "evaluation reads only the header"


def test_the_labeller_and_ingest_see_the_same_pixels():
    data, _ = _rotated_jpeg()
    ingested = Image.open(io.BytesIO(inspect_image(data, 10**6).data)).convert("RGB")
    labelled = to_rgb(decode_normalised(data, upright=True).image)
    assert labelled.size == ingested.size
    assert np.abs(np.asarray(labelled, np.int64) - np.asarray(ingested, np.int64)).max() <= 8
    assert decode_normalised(data).image.size == (40, 20), "the stream reads shards, which are upright already"


def test_a_cmyk_decompression_bomb_is_refused_before_any_decode():
    data = _cmyk_jpeg((10, 20, 30, 40))
    with pytest.raises(BadEntry) as info:
        inspect_image(data, 100)
    assert info.value.code == "too_large"
