"""Unit tests of the pieces under ingest: keys, masks, image checks, label files, tars (COCO masks: test_coco.py)."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from system.data import shards
from system.data.sources import BadEntry, SourceConfig, build_source
from system.data.sources.synthetic import class_names, render
from system.data.sources.voc import load_cls_labels
from system.data.validate import inspect_image
from system.masks import decode_mask, encode_mask, pascal_palette


def _jpeg(array: np.ndarray, mode: str | None = None, fmt: str = "JPEG") -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


RGB = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("sample_id", ["2007_000032", "a b", "ünï/cødé", "x.y-z", "A" * 60, "-", "1-2d"])
def test_key_escaping_is_safe_and_reversible(sample_id):
    key = shards.escape_id(sample_id)
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    assert shards.unescape_key(key) == sample_id


def test_escaping_is_injective_on_lookalikes():
    ids = ["a-b", "a.b", "a b", "a/b", "a-2db", "a_b"]
    assert len({shards.escape_id(i) for i in ids}) == len(ids)


@pytest.mark.parametrize("bad", ["", "  ", "../x", "/", "/abs/path", "a/../b", "tab\there", "./x"])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(shards.UnsafeId):
        shards.check_id(bad)


def test_palette_masks_roundtrip_with_voc_colours():
    mask = np.random.default_rng(1).integers(0, 21, (30, 40)).astype(np.uint8)
    mask[0] = 255
    data = encode_mask(mask)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P" and image.getpalette()[3:6] == [128, 0, 0]
    assert pascal_palette()[255 * 3 : 256 * 3] == [224, 224, 192]
    np.testing.assert_array_equal(decode_mask(data), mask)
    rgb = io.BytesIO()
    image.convert("RGB").save(rgb, format="PNG")
    np.testing.assert_array_equal(decode_mask(rgb.getvalue()), mask)


def test_image_checks_accept_good_and_convertible_images():
    assert inspect_image(_jpeg(RGB), 10**6).ext == "jpg"
    for mode, fmt, ext in (("L", "JPEG", "jpg"), ("RGBA", "PNG", "png"), ("P", "PNG", "png"), ("RGB", "WEBP", "webp")):
        data = _jpeg(RGB, mode, fmt)
        got = inspect_image(data, 10**6)
        assert (got.ext, got.data, got.width, got.height, got.converted) == (ext, data, 64, 48, ()), "kept as is"
    got = inspect_image(_jpeg(RGB, None, "BMP"), 10**6)
    assert got.ext == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(got.data))), RGB)


@pytest.mark.parametrize(
    "case,code",
    [
        ("empty", "empty"),
        ("truncated", "corrupt"),
        ("garbage", "unreadable"),
        ("text", "unreadable"),
        ("enormous", "too_large"),
    ],
)
def test_image_checks_reject_bad_images_with_reason(case, code):
    good = _jpeg(RGB)
    data = {
        "empty": b"",
        "truncated": good[: len(good) * 2 // 3],
        "garbage": np.random.default_rng(2).bytes(3000),
        "text": b"id,image\nthis is not an image\n",
        "enormous": good,
    }[case]
    with pytest.raises(BadEntry) as info:
        inspect_image(data, 1000 if case == "enormous" else 10**6)
    assert info.value.code == code


def test_cls_labels_npy_loads_and_refuses_code(tmp_path):
    table = {"2007_000032": np.eye(20, dtype=np.float32)[0] + np.eye(20, dtype=np.float32)[14]}
    good = tmp_path / "cls_labels.npy"
    np.save(good, table)
    loaded = load_cls_labels(str(good))
    np.testing.assert_array_equal(loaded["2007_000032"], table["2007_000032"])

    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))

    bad = tmp_path / "evil.npy"
    np.save(bad, np.array(Evil(), dtype=object), allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cls_labels(str(bad))


def test_synthetic_is_deterministic_and_tags_match_masks():
    a = render(3, 6, 64, seed=5)
    b = render(3, 6, 64, seed=5)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert render(4, 6, 64, seed=5)[0] != a[0]
    for index in range(40):
        _, mask, classes = render(index, 6, 64, seed=0)
        present = {int(v) - 1 for v in np.unique(mask) if 0 < v < 255}
        assert present == set(classes) and 1 <= len(classes) <= 3


def test_synthetic_classes_differ_in_colour():
    """The classes a tiny model must tell apart differ in mean hue, not only in shape."""
    means = {}
    for index in range(60):
        data, mask, _ = render(index, 6, 64, seed=1)
        rgb = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
        for k in range(6):
            region = mask == k + 1
            if region.sum() > 50:
                means.setdefault(k, []).append(rgb[region].mean(axis=0))
    centres = np.stack([np.mean(means[k], axis=0) for k in range(6)])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert distances[~np.eye(6, dtype=bool)].min() > 40
    assert len(set(class_names(6))) == 6


def test_synthetic_source_lists_entries_and_loads():
    source = build_source(SourceConfig(format="synthetic", num_images=5, num_classes=4, image_size=48, seed=2))
    entries = list(source.entries())
    assert [e.id for e in entries] == [f"syn2_{i:07d}" for i in range(5)]
    loaded = source.load(entries[0])
    assert loaded.mask.shape == (48, 48) and loaded.labels and set(loaded.labels) <= set(source.class_names)


def test_tar_bytes_depend_only_on_content():
    samples = [("k1", [("jpg", b"abc"), ("json", b"{}")]), ("k2", [("png", b"x" * 600)])]
    one, two = io.BytesIO(), io.BytesIO()
    size, digest = shards.write_tar(one, samples)
    shards.write_tar(two, samples)
    assert one.getvalue() == two.getvalue() and size == len(one.getvalue())
    import hashlib
    import tarfile

    assert digest == hashlib.sha256(one.getvalue()).hexdigest()
    members = tarfile.open(fileobj=io.BytesIO(one.getvalue())).getmembers()
    assert [m.name for m in members] == ["k1.jpg", "k1.json", "k2.png"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o444)}


def test_structure_verification_catches_truncation():
    good = _jpeg(RGB)
    png = _jpeg(RGB, None, "PNG")
    assert inspect_image(good, 10**6, "structure").ext == "jpg"
    assert inspect_image(png, 10**6, "structure").ext == "png"
    assert inspect_image(_jpeg(RGB, None, "BMP"), 10**6, "structure").ext == "png"
    for broken in (good[: len(good) - 40], png[: len(png) // 2]):
        with pytest.raises(BadEntry) as info:
            inspect_image(broken, 10**6, "structure")
        assert info.value.code == "corrupt"


def test_long_member_names_survive_tar_readers():
    import tarfile

    key = shards.escape_id("x" * 150 + " ü")
    out = io.BytesIO()
    shards.write_tar(out, [(key, [("jpg", b"a" * 1000), ("mask.png", b"")])])
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{key}.jpg", f"{key}.mask.png"]
        assert tar.extractfile(members[0]).read() == b"a" * 1000 and members[1].size == 0
    assert len(out.getvalue()) % 10240 == 0


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_reader_reads_what_tarfile_writes(fmt):
    import tarfile

    names = ["d/a.jpg", "d/a.json", "y" * 120 + ".jpg", "noext", "B.JPG", "B.mask.png"]
    if fmt == "ustar":
        names[2] = "p" * 90 + "/" + "y" * 60 + ".jpg"  # ustar splits long names into prefix + name
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=getattr(tarfile, f"{fmt.upper()}_FORMAT")) as tar:
        directory = tarfile.TarInfo("d")
        directory.type = tarfile.DIRTYPE  # not a file: skipped
        tar.addfile(directory)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 600 * i
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    files = list(shards.read_tar(io.BytesIO(out.getvalue())))
    assert files == [(name, bytes([i]) * 600 * i) for i, name in enumerate(names)]
    samples = list(shards.group_samples(files))
    assert [sorted(s) for s in samples] == [
        ["__key__", "jpg", "json"],
        ["__key__", "jpg"],
        ["__key__", "jpg", "mask.png"],
    ]
    assert samples[0]["__key__"] == "d/a" and samples[2]["__key__"] == "B"


def test_tar_reader_refuses_damaged_streams():
    import tarfile

    out = io.BytesIO()
    shards.write_tar(out, [("k1", [("jpg", b"a" * 1000)]), ("k2", [("jpg", b"b" * 1000)])])
    data = out.getvalue()
    assert [name for name, _ in shards.read_tar(io.BytesIO(data))] == ["k1.jpg", "k2.jpg"]
    for cut in (1500, 1600, 2000):  # inside the second header, its data, its padding
        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            list(shards.read_tar(io.BytesIO(data[:cut])))
    flipped = bytearray(data)
    flipped[1536 + 5] ^= 1  # a bit of the second header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(shards.read_tar(io.BytesIO(bytes(flipped))))


def test_csv_manifest_with_pipe_separated_labels_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg(RGB))
    (tmp_path / "list.csv").write_text('id,image,labels\nfirst,imgs/a.jpg,cat|dog\n"with, comma",imgs/a.jpg,dog\n')
    source = build_source(SourceConfig(format="manifest", path=str(tmp_path / "list.csv")))
    entries = list(source.entries())
    assert source.class_names == ["cat", "dog"]
    assert [(e.id, e.labels) for e in entries] == [("first", ("cat", "dog")), ("with, comma", ("dog",))]
    assert source.load(entries[0]).image == (tmp_path / "imgs" / "a.jpg").read_bytes()
    (tmp_path / "bad.csv").write_text("name,path\nx,y\n")
    with pytest.raises(ValueError, match="CSV header lacks"):
        build_source(SourceConfig(format="manifest", path=str(tmp_path / "bad.csv")))


def test_manifest_is_streamed_as_lines_and_entries_is_a_generator(tmp_path, monkeypatch):
    from system import storage

    lines = [json.dumps({"id": f"i{n}", "image": "a.jpg", "labels": ["cat" if n % 2 else "dog"]}) for n in range(5)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")

    def whole_file(uri):
        raise AssertionError(f"{uri} was read whole")

    monkeypatch.setattr(storage, "get_bytes", whole_file)
    source = build_source(SourceConfig(format="manifest", path=str(tmp_path / "m.jsonl")))
    entries = source.entries()
    assert source.class_names == ["cat", "dog"] and iter(entries) is entries
    items = list(entries)
    assert [e.id for e in items] == ["i0", "i1", "", "i2", "i3", "i4"]
    assert items[2].where.endswith("m.jsonl:3") and items[2].code == "malformed"
    assert [e.id for e in source.entries() if hasattr(e, "labels")] == ["i0", "i1", "i2", "i3", "i4"]
    monkeypatch.undo()
    listed = build_source(SourceConfig(format="manifest", path=str(tmp_path / "m.jsonl"), classes=["@classes.txt"]))
    assert listed.class_names == ["dog", "cat", "bird"]


def _dataset_json() -> dict:
    """A ``dataset.json`` as the ingest has always written it, keys in the file's order."""
    return {
        "format": shards.FORMAT_NAME,
        "version": shards.FORMAT_VERSION,
        "name": "voc-ü",
        "classes": ["aeroplane", "bicycle"],
        "shards": [
            {"name": "shard-000000.tar", "samples": 2, "bytes": 10240, "sha256": "ab" * 32},
            {"name": "shard-000001.tar", "samples": 1, "bytes": 5120, "sha256": "cd" * 32},
        ],
        "total_samples": 3,
        "total_bytes": 15360,
        "samples_with_masks": 1,
        "inputs": 5,
        "rejected": {"total": 2, "by_code": {"cmyk": 1, "no_labels": 1}},
        "source": {"format": "voc", "path": "/data/VOC2012"},
    }


def test_dataset_record_writes_the_same_bytes_as_the_format_always_had():
    raw = _dataset_json()
    info = shards.DatasetInfo.from_json(raw)
    assert info.classes == ["aeroplane", "bicycle"]
    assert info.shards[1] == shards.ShardInfo("shard-000001.tar", 1, 5120, "cd" * 32)
    assert info.rejected.by_code == {"cmyk": 1, "no_labels": 1} and info.extra == {}
    assert info.encode() == (json.dumps(raw, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def test_keys_a_newer_version_added_are_kept_and_written_back(tmp_path):
    raw = {**_dataset_json(), "languages": ["en"]}
    (tmp_path / "dataset.json").write_text(json.dumps(raw, indent=1))
    info = shards.read_dataset(str(tmp_path))
    assert info.extra == {"languages": ["en"]}
    assert json.loads(info.encode()) == raw and list(json.loads(info.encode())) == list(raw)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.pop("classes"), "'classes' is missing"),
        (lambda d: d.update(total_samples="3"), "'total_samples' must be int, got str"),
        (lambda d: d.update(inputs=True), "'inputs' must be int, got bool"),
        (lambda d: d.update(total_bytes=-1), "'total_bytes' must not be negative"),
        (lambda d: d["shards"][1].pop("sha256"), r"shards\[1\]: field 'sha256' is missing"),
        (lambda d: d["shards"].__setitem__(0, "shard-000000.tar"), r"shards\[0\]: must be an object"),
        (lambda d: d["rejected"]["by_code"].update(cmyk="1"), r"rejected.by_code: field 'cmyk' must be int"),
        (lambda d: d.update(classes=["a", 2]), "'classes' must be a list of strings"),
        (lambda d: d.update(total_samples=4), "'total_samples' is 4 but the shards hold 3 samples"),
        (lambda d: d.update(version=2), "unsupported dataset format 'clustercam-wds' v2"),
    ],
)
def test_a_malformed_dataset_json_is_an_error_naming_the_file_and_the_field(tmp_path, change, field):
    raw = _dataset_json()
    change(raw)
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(shards.DatasetFileError, match=f"{tmp_path / 'dataset.json'}: .*{field}"):
        shards.read_dataset(str(tmp_path))


def test_a_dataset_json_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(shards.DatasetFileError, match=f"{tmp_path / 'dataset.json'}: not valid JSON"):
        shards.read_dataset(str(tmp_path))


def test_openimages_exhaustive_classes_are_negatives_wherever_they_are_not_tagged(tmp_path):
    from tests.ingest_inputs import make_openimages_partial

    make_openimages_partial(tmp_path, sorted_rows=True)
    source = build_source(SourceConfig(format="openimages", path=str(tmp_path), exhaustive=["Vehicle", "/m/d"]))
    entries = {e.id: e for e in source.entries() if hasattr(e, "negatives")}
    assert entries["0a"].labels == ("Dog",) and set(entries["0a"].negatives) == {"Car", "Vehicle"}
    assert set(entries["0c"].negatives) == {"Dog", "Vehicle"}  # not verified there, but declared complete
    loaded = source.load(entries["0a"])
    assert loaded.negatives == entries["0a"].negatives
    with pytest.raises(ValueError, match="source.exhaustive"):
        build_source(SourceConfig(format="openimages", path=str(tmp_path), exhaustive=["Unicorn"]))
