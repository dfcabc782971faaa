"""WebDataset shards written by other tools (here the ``webdataset`` package's own TarWriter) as a source."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from system import storage
from system.data.shards import escape_id
from system.data.sources import BadEntry, Entry, SourceConfig, build_source
from system.data.sources.webdataset import parse_labels, tar_uris
from system.data.stream import eval_loader
from tests import ingest_inputs as inputs

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}


class _Trap:
    """Pickled into ``pyd`` members: unpickling it would create ``path``, which must never happen."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _encoded(colour, fmt: str, size=(24, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def _write_shards(folder, trap: str) -> dict[str, list[str]]:
    """Three tars in the styles other tools write; returns each good sample's expected class names."""
    names = list(COLOURS)
    expected: dict[str, list[str]] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(3):
        with wds.TarWriter(str(folder / f"part-{shard:06d}.tar")) as sink:
            for i in range(4):
                key = f"s{shard}-{i:03d}"
                chosen = names[(shard + i) % 3]
                sample = {"__key__": key, "pyd": _Trap(trap)}
                if shard == 0:  # jpg + json with class names
                    sample |= {"jpg": _encoded(COLOURS[chosen], "JPEG"), "json": {"labels": [chosen], "w": 24}}
                elif shard == 1:  # png + cls index (img2dataset / classification style)
                    sample |= {"png": _encoded(COLOURS[chosen], "PNG"), "cls": names.index(chosen)}
                else:  # jpeg + json "classes" as indices, a webp among them
                    fmt, ext = ("WEBP", "webp") if i == 0 else ("JPEG", "jpeg")
                    sample |= {ext: _encoded(COLOURS[chosen], fmt), "json": {"classes": [names.index(chosen)]}}
                sink.write(sample)
                expected[key] = [chosen]
            sink.write({"__key__": f"s{shard}-nolabel", "jpg": _encoded((9, 9, 9), "JPEG"), "json": {"caption": "x"}})
            sink.write({"__key__": f"s{shard}-noimage", "json": {"labels": ["cat"]}})
    return expected


def test_labels_come_from_common_json_keys_or_a_cls_member():
    assert parse_labels({"json": b'{"labels": ["a", "b"]}'}) == ["a", "b"]
    assert parse_labels({"json": b'{"tags": "a"}'}) == ["a"]
    assert parse_labels({"json": b'{"classes": [3, 1]}'}) == [3, 1]
    assert parse_labels({"json": b'{"caption": "x"}', "cls": b"2"}) == [2]
    assert parse_labels({"cls": b"1 4"}) == [1, 4] and parse_labels({"cls": b"[0, 2]"}) == [0, 2]
    for bad, code in ((b"x", "malformed"), (b"-1", "malformed")):
        with pytest.raises(BadEntry) as info:
            parse_labels({"cls": bad})
        assert info.value.code == code
    with pytest.raises(BadEntry) as info:
        parse_labels({"json": b'{"caption": "x"}'})
    assert info.value.code == "no_labels"


def test_a_path_is_a_tar_a_brace_pattern_or_a_folder(tmp_path):
    _write_shards(tmp_path / "wds", str(tmp_path / "trap"))
    folder = sorted(tar_uris(str(tmp_path / "wds")))
    assert [u.rsplit("/", 1)[1] for u in folder] == [f"part-{i:06d}.tar" for i in range(3)]
    assert tar_uris(str(tmp_path / "wds" / "part-{000000..000002}.tar")) == folder
    assert tar_uris(folder[0]) == folder[:1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        tar_uris(str(tmp_path / "empty"))


def test_index_labels_are_named_by_a_classes_file_and_unknown_indices_are_rejects(tmp_path):
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "one", "jpg": _encoded((1, 2, 3), "JPEG"), "cls": 1})
        sink.write({"__key__": "two", "jpg": _encoded((1, 2, 3), "JPEG"), "cls": 7})
    (tmp_path / "classes.txt").write_text("zero\none\n")
    cfg = SourceConfig(format="webdataset", path=str(tmp_path / "a.tar"), classes_file=str(tmp_path / "classes.txt"))
    source = build_source(cfg)
    first, second = list(source.entries())
    assert source.class_names == ["zero", "one"] and isinstance(first, Entry) and first.labels == ("one",)
    assert second.code == "unknown_class" and "index 7" in second.reason
    unnamed = build_source(SourceConfig(format="webdataset", path=str(tmp_path / "a.tar")))
    assert unnamed.class_names == [str(i) for i in range(8)]


@pytest.mark.usefixtures("ray_cluster")
def test_a_tarwriter_shard_set_on_s3_ingests_and_streams_like_any_other(tmp_path, s3_root):
    from pipelines.ingest import IngestConfig, run

    trap = str(tmp_path / "unpickled")
    expected = _write_shards(tmp_path / "wds", trap)
    for path in sorted((tmp_path / "wds").iterdir()):
        storage.upload_file(path, storage.join(s3_root, "input", path.name))
    output = storage.join(s3_root, "ingested")
    info = run(
        IngestConfig(
            output=output,
            source=SourceConfig(
                format="webdataset",
                path=storage.join(s3_root, "input", "part-{000000..000002}.tar"),
                classes=list(COLOURS),
            ),
            shard_size=5,
            progress_every_s=0.0,
        )
    )
    assert info.classes == list(COLOURS) and info.total_samples == 12 and info.inputs == 18
    assert info.rejected.by_code == {"no_image": 3, "no_labels": 3}
    samples = inputs.read_samples(output)
    assert set(samples) == {escape_id(k) for k in expected}
    for key, names in expected.items():
        sample = samples[escape_id(key)]
        meta, _, size = inputs.sample_truth(sample)
        assert meta["labels"] == [list(COLOURS).index(n) for n in names] and size == (24, 20)
        assert not any(ext in sample for ext in ("pyd", "cls")), "only the image and our json are stored"
    seen = 0
    for batch in eval_loader(output, batch_size=4, image_size=16):
        images, labels = batch["images"], batch["labels"]
        seen += len(images)
        assert labels.sum(dim=1).eq(1).all()
    assert seen == 12
    assert not os.path.exists(trap), "a pyd member was unpickled"
    for key, names in expected.items():
        sample = samples[escape_id(key)]
        image = next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)
        np.testing.assert_allclose(
            np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[10, 12], COLOURS[names[0]], atol=12
        )
    assert json.loads(samples[escape_id("s0-000")]["json"])["source"].endswith("part-000000.tar#s0-000")
