"""Labelling without Ray: inference matches the library, batching, outputs, consistency, previews.

Also home of the helpers the Ray/S3 labelling tests share (tiny model, synthetic shard datasets).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
import numpy as np
import pytest
import torch
from PIL import Image

from system import storage
from system.cam import multi_scale_cam, predict_probs
from system.data.ingest import finalize
from system.data.shards import DatasetInfo, escape_id, shard_name, write_tar
from system.data.sources.synthetic import class_names as synthetic_names
from system.data.sources.synthetic import render
from system.hardware import resolve_precision
from system.label.config import LabelConfig
from system.label.infer import Labeller, model_size, size_batches, to_input
from system.label.inputs import ClassMismatch, Sample, check_classes, plan_inputs, unit_samples
from system.label.outputs import (
    OutputWriter,
    confusion_from_sparse,
    list_mask_keys,
    mask_stats,
    sparse_confusion,
)
from system.label.previews import contact_sheet, overlay, png_bytes
from system.masks import decode_mask, encode_mask, mask_codec
from system.metrics import ConfusionMatrix
from system.model import build_clustercam, export_model
from system.refine import denormalize, pseudo_labels
from system.rejects import Reject

K = 3
NAMES = synthetic_names(K)
TINY = dict(num_classes=K, embed_dim=48, depth=12, num_heads=6, img_size=64, drop_path_rate=0.0, decoder_channels=64)


def tiny_model(seed: int = 0, head: str = "authors"):
    torch.manual_seed(seed)
    model = build_clustercam(**TINY, head=head).eval()
    # a fresh decoder predicts nearly uniform probabilities: sharpen it so argmax ties cannot occur
    with torch.no_grad():
        model.decoder.conv8.weight.mul_(40)
    return model


def export_tiny(dest: str, seed: int = 0, names=NAMES) -> str:
    export_model(tiny_model(seed), dest, class_names=names, run_id=f"tiny-{seed}")
    return dest


def synthetic_sample(i: int, size: int = 64) -> tuple[str, list[tuple[str, bytes]], np.ndarray, list[int]]:
    jpg, mask, classes = render(i, K, size, seed=3)
    meta = {"id": f"img/{i}", "labels": classes, "width": size, "height": size, "source": "synthetic"}
    members = [("jpg", jpg), ("json", json.dumps(meta).encode()), ("mask.png", encode_mask(mask))]
    return escape_id(meta["id"]), members, mask, classes


def write_dataset(
    root: str, samples: list[tuple[str, list[tuple[str, bytes]]]], shard_size: int = 4, names=NAMES
) -> DatasetInfo:
    """A dataset in the ingest's exact format (shards, then dataset.json via ``finalize``)."""
    parts = []
    for index, start in enumerate(range(0, len(samples), shard_size)):
        group = samples[start : start + shard_size]
        with storage.open_write(storage.join(root, shard_name(index))) as f:
            size, sha = write_tar(f, group)
        masks = sum(any(ext == "mask.png" for ext, _ in members) for _, members in group)
        parts.append(
            {
                "name": shard_name(index),
                "samples": len(group),
                "masks": masks,
                "bytes": size,
                "sha256": sha,
                "rejects": [],
            }
        )
    return finalize(root, "test", list(names), parts, [], len(samples), {"format": "test"})


def jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def labeller(model, **overrides) -> Labeller:
    cfg = LabelConfig(model="m", data="d", output="o", **{"precision": "fp32", "batch_size": 4, **overrides})
    return Labeller(model, cfg, NAMES)


def sample(i: int, size: int = 64) -> Sample:
    key, members, _, classes = synthetic_sample(i, size)
    parts = dict(members)
    return Sample(key, f"img/{i}", tuple(classes), parts["jpg"], parts["mask.png"], "test")


def run_all(lab: Labeller, samples):
    with ThreadPoolExecutor(2) as pool:
        return list(lab.label(samples, pool))


# ---- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["authors", "scalable"])
def test_seg_masks_equal_predict_probs_argmax(head):
    model = tiny_model(head=head)
    samples = [sample(i) for i in range(5)]
    out = run_all(labeller(model, restrict_to_tags=False, scales=[0.5, 1.0, 1.5]), samples)
    assert [o.sample.key for o in out] == [s.key for s in samples]
    x = torch.stack([to_input(np.array(Image.open(io.BytesIO(s.image)).convert("RGB"))) for s in samples])
    with torch.no_grad():
        expected = predict_probs(model, x, (0.5, 1.0, 1.5)).argmax(1).numpy()
    for o, e in zip(out, expected):
        assert o.masks["seg"].shape == (64, 64) and o.masks["seg"].dtype == np.uint8
        np.testing.assert_array_equal(o.masks["seg"], e)
    assert len({tuple(np.unique(e)) for e in expected}) > 1 or len(np.unique(expected)) > 1  # not a constant map


def test_an_image_gets_the_same_mask_alone_and_in_a_batch():
    # convolution kernels are picked by memory layout: the model input must not depend on batching
    pixels = [np.array(Image.open(io.BytesIO(sample(i).image)).convert("RGB")) for i in range(3)]
    alone, batched = to_input(pixels[1])[None], to_input(np.stack(pixels))[1:2]
    assert alone.is_contiguous() and batched.is_contiguous() and alone.stride() == batched.stride()
    model = tiny_model()
    samples = [sample(i) for i in range(3)]
    one_by_one = run_all(labeller(model, restrict_to_tags=False, batch_size=1), samples)
    together = run_all(labeller(model, restrict_to_tags=False, batch_size=3), samples)
    for a, b in zip(one_by_one, together):
        np.testing.assert_array_equal(a.masks["seg"], b.masks["seg"])


def test_tag_restriction_only_allows_background_and_tags():
    model = tiny_model()
    samples = [sample(i) for i in range(6)]
    out = run_all(labeller(model, scales=[1.0]), samples)
    x = torch.stack([to_input(np.array(Image.open(io.BytesIO(s.image)).convert("RGB"))) for s in samples])
    with torch.no_grad():
        probs = predict_probs(model, x, (1.0,))
    for o, s, p in zip(out, samples, probs):
        allowed = torch.zeros(K + 1)
        allowed[[0, *[k + 1 for k in s.labels]]] = 1
        np.testing.assert_array_equal(o.masks["seg"], (p * allowed[:, None, None]).argmax(0).numpy())
        assert set(np.unique(o.masks["seg"])) <= {0, *[k + 1 for k in s.labels]}
    unrestricted = run_all(labeller(model, scales=[1.0], restrict_to_tags=False), samples)
    assert any(not np.array_equal(a.masks["seg"], b.masks["seg"]) for a, b in zip(out, unrestricted))


@pytest.mark.parametrize("head", ["authors", "scalable"])
def test_cam_mode_equals_library_pseudo_labels(head):
    model = tiny_model(head=head)
    samples = [sample(i) for i in range(3)]
    out = run_all(labeller(model, mode="cam", cam_scales=[1.0, 0.75]), samples)
    x = torch.stack([to_input(np.array(Image.open(io.BytesIO(s.image)).convert("RGB"))) for s in samples])
    tags = torch.zeros(3, K)
    for i, s in enumerate(samples):
        tags[i, list(s.labels)] = 1
    with torch.no_grad():
        cams = multi_scale_cam(model, x, (1.0, 0.75)) * tags[:, :, None, None]
        expected = pseudo_labels(denormalize(x), cams, tags)
    for o, e, s in zip(out, expected, samples):
        np.testing.assert_array_equal(o.masks["cam"], e.numpy())
        assert set(np.unique(o.masks["cam"])) <= {0, 255, *[k + 1 for k in s.labels]}
        assert 0 <= o.confidence["cam"] <= 1


def test_large_and_small_images_are_resized_and_masks_come_back_at_full_size():
    model = tiny_model()
    rng = np.random.default_rng(0)
    big = Sample("big", "big", (0,), jpeg(rng.integers(0, 255, (150, 260, 3), dtype=np.uint8)), None, "t")
    tiny = Sample("tiny", "tiny", (1,), jpeg(rng.integers(0, 255, (12, 40, 3), dtype=np.uint8)), None, "t")
    out = {o.sample.key: o for o in run_all(labeller(model, mode="both", max_side=96), [big, tiny])}
    assert out["big"].model_size == (55, 96) and out["big"].masks["seg"].shape == (150, 260)
    assert out["big"].masks["cam"].shape == (150, 260)
    assert min(out["tiny"].model_size) >= 32 and out["tiny"].masks["seg"].shape == (12, 40)


def test_unreadable_images_fail_alone_with_a_reason():
    model = tiny_model()
    good = [sample(i) for i in range(3)]
    bad = Sample("bad", "bad", (0,), b"\xff\xd8 not a jpeg", None, "shard-x")
    flagged = Sample(
        "meta",
        "meta",
        (),
        None,
        None,
        "shard-x",
        Reject("meta", "shard-x", "malformed", "bad sample metadata (KeyError)", "meta"),
    )
    wrong_gt = Sample("gt", "gt", (0,), good[0].image, encode_mask(np.zeros((5, 5), np.uint8)), "shard-x")
    out = run_all(labeller(model, scales=[1.0]), [good[0], bad, good[1], flagged, wrong_gt, good[2]])
    failures = {o.key: o.reason for o in out if isinstance(o, Reject)}
    assert set(failures) == {"bad", "meta", "gt"}
    assert {o.key: o.code for o in out if isinstance(o, Reject)} == {
        "bad": "corrupt",
        "meta": "malformed",
        "gt": "mask_size",
    }
    assert (
        failures["bad"].startswith("unreadable image")
        and "metadata" in failures["meta"]
        and "GT mask is 5x5" in failures["gt"]
    )
    assert sorted(o.sample.key for o in out if not isinstance(o, Reject)) == sorted(s.key for s in good)


def test_size_batches_groups_equal_sizes_and_bounds_memory():
    sizes = [(1, 1), (2, 2), (1, 1), (3, 3), (1, 1), (2, 2), (4, 4), (5, 5), (1, 1)]
    batches = list(size_batches(list(enumerate(sizes)), lambda t: t[1], batch_size=3, max_held=5))
    assert all(len({s for _, s in b}) == 1 and len(b) <= 3 for b in batches)
    assert sorted(i for b in batches for i, _ in b) == list(range(len(sizes)))
    assert [i for i, _ in batches[0]] == [0, 2, 4]  # a full bucket leaves at once
    assert [i for i, _ in batches[1]] == [1, 5]  # five held: the fullest bucket leaves early


def test_model_size_caps_and_floors():
    assert model_size(375, 500, 1024, 32) == (375, 500)
    assert model_size(2000, 3000, 1000, 32) == (667, 1000)
    assert model_size(10, 100, 1000, 32) == (32, 320)


def test_precision_auto_is_fp32_where_bf16_is_not_native():
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", torch.device("cpu")).dtype == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision("fp32", torch.device("cpu")).dtype is torch.float32
    assert resolve_precision("bf16", torch.device("cpu")).dtype is torch.bfloat16


def test_a_precision_the_labeller_is_given_is_the_one_it_reports():
    model = tiny_model()
    for name in ("fp32", "bf16"):
        assert labeller(model, precision=name).precision.name == name


def test_fp16_precision_on_a_cpu_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


# ---- outputs -----------------------------------------------------------------------------------


PNG = mask_codec("png")


def test_mask_png_carries_its_stats_line_and_stays_a_palette_png():
    mask = np.array([[0, 1, 255], [2, 2, 0]], dtype=np.uint8)
    line = {"key": "k", "classes": ["a"], "confusion": [[0, 0, 3]]}
    png = PNG.encode(mask, line)
    assert PNG.read_line(png) == line and PNG.read_line(PNG.encode(mask)) is None
    np.testing.assert_array_equal(decode_mask(png), mask)
    assert Image.open(io.BytesIO(png)).mode == "P"
    np.testing.assert_array_equal(PNG.decode(png), mask)
    with pytest.raises(ValueError, match="mask format 'tiff' is not one of png"):
        mask_codec("tiff")
    stats = mask_stats(mask, ["a", "b"])
    assert stats["classes"] == ["a", "b"]
    assert stats["fractions"] == {
        "background": round(2 / 6, 6),
        "a": round(1 / 6, 6),
        "b": round(2 / 6, 6),
        "ignore": round(1 / 6, 6),
    }


def test_sparse_confusion_sums_to_the_direct_matrix():
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 4, (7, 9)) for _ in range(3)]
    preds = [np.where(rng.random((7, 9)) < 0.1, 255, rng.integers(0, 4, (7, 9))) for _ in range(3)]
    gts[0][0, :] = 255
    sparse = [sparse_confusion(g, p, 4) for g, p in zip(gts, preds)]
    direct = ConfusionMatrix(4)
    for g, p in zip(gts, preds):
        direct.add(g, p)
    summed = confusion_from_sparse(sparse, 4)
    np.testing.assert_allclose(summed.iou(), direct.iou())
    assert summed.miou() == pytest.approx(direct.miou())


def test_a_mask_write_cut_off_by_the_network_is_retried_never_recorded_as_the_images_failure(tmp_path, monkeypatch):
    out = str(tmp_path / "job")
    cfg = LabelConfig(model="m", data="d", output=out, precision="fp32", scales=[1.0], flush_every=1000)
    results = run_all(Labeller(tiny_model(), cfg, NAMES), [sample(i) for i in range(3)])
    unlucky = results[1].sample.key
    real_put = storage.put_bytes

    def put(uri, data):
        if uri.endswith(f"/{unlucky}.png"):
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        real_put(uri, data)

    monkeypatch.setattr(storage, "put_bytes", put)
    with ThreadPoolExecutor(2) as pool:
        writer = OutputWriter(cfg, NAMES, "run1", "a0", "model", pool)
        writer.begin_unit()
        for r in results:
            writer.submit(r)
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            writer.collect(wait=True)
        writer.settle()
        assert writer.stored == {r.sample.key for r in results} - {unlucky}, "what was stored counts as done"
        assert writer.failures == [] and writer.written == 2, "a network fault is not the image's failure"
        monkeypatch.setattr(storage, "put_bytes", real_put)
        writer.submit(results[1])  # the unit's next try
        assert writer.close() == []
    assert list_mask_keys(storage.join(out, "masks")) == {r.sample.key for r in results}


def test_previews_are_images_with_a_legend():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 10:50] = 2
    mask[45:, :] = 255
    image = overlay(np.full((60, 80, 3), 120, np.uint8), mask, NAMES, title="k", min_side=0)
    assert image.size[0] == 2 * 80 + 4 and image.size[1] > 60
    pixels = np.asarray(image)
    assert (pixels == (0, 128, 0)).all(axis=-1).any()  # the legend swatch of class index 2 (PASCAL green)


def test_small_images_are_scaled_up_with_the_mask_kept_sharp():
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 1
    pixels = np.zeros((16, 16, 3), np.uint8)
    image = overlay(pixels, mask, NAMES, min_side=128)
    assert image.size[0] == 2 * 128 + 4
    blended = np.asarray(image)[:128, 128 + 4 :].astype(int)
    assert len({tuple(c) for c in blended.reshape(-1, 3)}) == 2, "nearest-neighbour: two colours, no blend at the edge"
    assert (blended[:, 63] == 0).all() and (blended[:, 64] > 0).any()


def test_the_contact_sheet_packs_tiles_in_rows_without_gaps():
    sizes = [(100, 100), (200, 100), (100, 200), (100, 100), (125, 100), (60, 60), (100, 100)]  # (width, height)
    tiles = [Image.new("RGB", size, (40 * i, 90, 200 - 20 * i)) for i, size in enumerate(sizes)]
    sheet = contact_sheet(tiles, columns=3, gap=4)
    assert sheet.width == 3 * 100 + 4 * 4, "three median-wide tiles and their gaps"
    white = (np.asarray(sheet) == 255).all(axis=-1)
    rows = ~white[:, 4:-4].all(axis=1)
    edges = np.flatnonzero(np.diff(np.r_[0, rows.astype(int), 0]))
    bands = list(zip(edges[::2], edges[1::2]))
    assert len(bands) == 3 and all(b[0] - a[1] == 4 for a, b in zip(bands, bands[1:])), "rows apart by the gap only"
    for top, bottom in bands[:2]:  # a full row is filled from edge to edge but for the gaps between tiles
        filled = ~white[top:bottom].all(axis=0)
        assert filled[4:-4].sum() == sheet.width - 8 - 2 * 4 and not filled[:4].any() and not filled[-4:].any()
    assert sheet.height == bands[-1][1] + 4


def test_a_contact_sheet_of_previews_is_a_png_with_every_tile_drawn():
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(5):
        mask = np.zeros((64, 64), np.uint8)
        mask[8 * i : 8 * i + 30, 10:50] = 1 + i % 3
        tiles.append(overlay(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8), mask, NAMES, title=f"t{i}"))
    assert tiles[0].size[0] == 2 * 256 + 4, "64-pixel images are drawn at 256"
    sheet = Image.open(io.BytesIO(png_bytes(contact_sheet(tiles, columns=4, gap=4))))
    assert sheet.format == "PNG" and sheet.size == (4 * tiles[0].width + 5 * 4, 2 * tiles[0].height + 3 * 4)
    pixels = np.asarray(sheet.convert("RGB"))
    w, h = tiles[0].size
    for i in range(5):
        x, y = 4 + (i % 4) * (w + 4), 4 + (i // 4) * (h + 4)
        cell = pixels[y : y + 256, x : x + w]
        assert cell.std() > 20, f"tile {i} is drawn"


# ---- inputs ------------------------------------------------------------------------------------


def test_class_checks():
    assert check_classes(3, NAMES, NAMES, "d") == NAMES
    assert check_classes(3, None, NAMES, "d") == NAMES
    with pytest.raises(ClassMismatch, match="2 classes but the model has 3"):
        check_classes(3, None, NAMES[:2], "d")
    with pytest.raises(ClassMismatch, match="class names differ"):
        check_classes(3, ["x", "y", "z"], NAMES, "dataset s3://d")
    with pytest.raises(ClassMismatch, match="no class names"):
        check_classes(3, None, None, "d")


def test_manifest_units_and_unknown_labels(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"id": f"m{i}", "image": f"{i}.png", "labels": [NAMES[i]]} for i in range(3)] + [{"id": "broken"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_inputs(str(manifest), 3, NAMES, chunk=2)
    units = list(plan.units)
    assert plan.kind == "manifest" and [len(u.entries) for u in units] == [2, 1] and plan.total == 4
    assert (
        len(plan.rejects) == 1 and plan.unit_count == 2 and [u.name for u in units] == ["chunk-000000", "chunk-000001"]
    )
    samples = list(unit_samples(units[0], {n: k for k, n in enumerate(NAMES)}, skip={"m1"}))
    assert samples[0].labels == (0,) and samples[0].image.startswith(b"\x89PNG") and samples[1] == "m1"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "a", "image": "0.png", "labels": ["nope"]}) + "\n")
    with pytest.raises(ClassMismatch, match="nope"):
        plan_inputs(str(tmp_path / "bad.jsonl"), 3, NAMES, chunk=2)


def test_shard_units_skip_done_keys_before_decoding(tmp_path):
    samples = [synthetic_sample(i)[:2] for i in range(5)]
    write_dataset(str(tmp_path / "ds"), samples, shard_size=3)
    plan = plan_inputs(str(tmp_path / "ds"), 3, None, chunk=10)
    assert plan.kind == "dataset" and len(plan.units) == 2 and plan.class_names == NAMES
    got = list(unit_samples(plan.units[0], {n: k for k, n in enumerate(NAMES)}, skip={samples[1][0]}))
    assert got[1] == samples[1][0] and isinstance(got[0], Sample) and got[0].gt is not None
    with pytest.raises(ClassMismatch, match="3 classes but the model has 4"):
        plan_inputs(str(tmp_path / "ds"), 4, None, chunk=10)


def test_configs_and_cli_keys():
    from pathlib import Path

    from system.config import ConfigError, load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(LabelConfig, configs / "label.yaml").modes == ("seg",)
    assert load_config(LabelConfig, configs / "label-tiny.yaml").modes == ("cam", "seg")
    keys = ["model=m", "data=s3://b/d", "output=o", "mode=cam", "scales=[0.5, 1.0]", "batch_size=4", "num_actors=3"]
    cfg = load_config(LabelConfig, None, keys)
    assert (cfg.mode, cfg.scales, cfg.batch_size, cfg.num_actors, cfg.data) == ("cam", [0.5, 1.0], 4, 3, "s3://b/d")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(LabelConfig, None, [*keys, "batch_sise=2"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(LabelConfig, None, [*keys, "mode=crf"])
    with pytest.raises(ConfigError, match="crf applies to seg"):
        load_config(LabelConfig, None, [*keys, "crf=true"])
    with pytest.raises(ConfigError, match="missing required config key: model"):
        load_config(LabelConfig, None, keys[1:])


def test_crf_is_an_optional_extra(tmp_path):
    from system.label.infer import crf_available, dense_crf

    probs = np.zeros((3, 16, 16), np.float32)
    probs[0, :, :8], probs[1, :, 8:] = 0.9, 0.9
    probs[2] = 0.05
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, 8:] = 200
    if crf_available():
        labels = dense_crf(pixels, probs)
        assert labels.shape == (16, 16) and (labels[:, :8] == 0).all() and (labels[:, 8:] == 1).all()
        return
    with pytest.raises(RuntimeError, match="'crf' extra"):
        dense_crf(pixels, probs)
    from pipelines.label import prepare

    model = export_tiny(str(tmp_path / "model"))
    write_dataset(str(tmp_path / "ds"), [synthetic_sample(0)[:2]])
    with pytest.raises(ValueError, match="'crf' extra"):
        prepare(LabelConfig(model=model, data=str(tmp_path / "ds"), output=str(tmp_path / "out"), crf=True))
