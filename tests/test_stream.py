"""The training/eval stream over shards on the S3 server: coverage, equal steps, determinism, resume."""

from __future__ import annotations

import collections
import hashlib
import io
import threading

import pytest
import torch
import webdataset as wds

from system import storage
from system.data import ingest
from system.data.shards import read_dataset, shard_uris
from system.data.sources import SourceConfig, build_source
from system.data.stream import StreamConfig, Streams, _BatchSlots, _mix, eval_loader, shard_samples, train_loader
from system.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.datasets import build_synthetic

NUM_IMAGES, SHARD_SIZE, SIZE = 38, 4, 48


def build_dataset(uri: str, num_images: int = NUM_IMAGES, shard_size: int = SHARD_SIZE, num_classes: int = 4) -> dict:
    """Ingest synthetic scenes in-process (no Ray): the stream only needs the shard contract."""
    return build_synthetic(uri, num_images, num_classes, image_size=SIZE, shard_size=shard_size, seed=3)


@pytest.fixture(scope="module")
def dataset(s3_server):
    uri = f"s3://clustercam-test/stream-{hashlib.sha1(str(id(s3_server)).encode()).hexdigest()[:8]}"
    build_dataset(uri)
    return uri


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def _cfg(**kw) -> StreamConfig:
    base = dict(batch_size=3, image_size=SIZE, augment="none", num_workers=2, shuffle_buffer=10, seed=7)
    return StreamConfig(**(base | kw))


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(dataset):
    expected = collections.Counter(_digest(img) for b in eval_loader(dataset, 8, SIZE) for img in b["images"])
    assert sum(expected.values()) == NUM_IMAGES and len(expected) == NUM_IMAGES
    for epoch in (0, 1):
        seen = collections.Counter()
        for rank in (0, 1):
            for images, labels, known in train_loader(dataset, rank, 2, _cfg(resampled=False), epoch=epoch):
                assert images.shape[1:] == (3, SIZE, SIZE) and labels.shape[1] == 4
                assert bool((known == 1).all())  # complete labels: every class known
                seen.update(_digest(img) for img in images)
        assert seen == expected


def test_resampled_ranks_take_equal_steps_of_full_batches(dataset):
    counts = []
    for rank in (0, 1):
        loader = train_loader(dataset, rank, 2, _cfg(resampled=True, epoch_batches=5))
        assert len(loader) == 5
        batches = list(loader)
        assert all(images.shape[0] == 3 for images, _, _ in batches)
        counts.append(len(batches))
    assert counts == [5, 5]
    default = list(train_loader(dataset, 0, 2, _cfg(resampled=True, num_workers=0)))
    assert len(default) == NUM_IMAGES // (2 * 3)


def test_paper_augmentation_is_deterministic_and_epoch_dependent(dataset):
    cfg = _cfg(augment="paper", epoch_batches=4)
    first = list(train_loader(dataset, 0, 1, cfg, epoch=2))
    again = list(train_loader(dataset, 0, 1, cfg, epoch=2))
    other = list(train_loader(dataset, 0, 1, cfg, epoch=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    images, labels, _ = first[0]
    assert images.dtype == torch.float32 and labels.dtype == torch.float32
    assert set(labels.unique().tolist()) <= {0.0, 1.0} and (labels.sum(1) >= 1).all()


def test_batches_held_by_the_consumer_survive_slot_reuse(dataset):
    """Workers write batches into reused shared slots: a batch the trainer keeps must not change when
    its slot is written again (16 batches over 2 workers x 5 slots)."""
    for augment in ("paper", "light"):
        loader = train_loader(dataset, 0, 1, _cfg(augment=augment, batch_size=2, epoch_batches=16))
        held, digests = [], []
        for images, _, _ in loader:
            held.append(images)
            digests.append(_digest(images))
        assert len(held) == 16 and [_digest(images) for images in held] == digests
        assert len(set(digests)) == 16


def test_a_worker_waits_for_a_free_slot_and_an_early_stop_releases_it():
    slots = _BatchSlots(workers=1, slots=2, batch_size=2, layout=((2,), torch.uint8))
    item = lambda value: torch.full((2,), value, dtype=torch.uint8)  # noqa: E731
    first = slots.write(0, 0, [item(1), item(1)], torch.stack)
    slots.write(0, 1, [item(2)], torch.stack)
    third = threading.Thread(target=slots.write, args=(0, 2, [item(3), item(3)], torch.stack))
    third.start()
    third.join(0.3)
    assert third.is_alive() and slots.read(first).tolist() == [[1, 1], [1, 1]]  # both slots taken: it waits
    slots.release(first)
    third.join(5)
    assert not third.is_alive() and slots.read(first).tolist() == [[3, 3], [3, 3]]  # batch 2 -> slot 0
    fourth = threading.Thread(target=slots.write, args=(0, 3, [item(4)], torch.stack))
    fourth.start()
    slots.unblock()  # the consumer stopped: nobody will release slot 1
    fourth.join(5)
    assert not fourth.is_alive()
    slots.reset()  # a new pass: the permits unblock() handed out are gone
    slots.write(0, 0, [item(5)], torch.stack)
    slots.write(0, 1, [item(6)], torch.stack)
    fifth = threading.Thread(target=slots.write, args=(0, 2, [item(7)], torch.stack))
    fifth.start()
    fifth.join(0.3)
    assert fifth.is_alive()
    slots.unblock()
    fifth.join(5)


def test_state_of_callers_rng_is_untouched(dataset):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(train_loader(dataset, 0, 1, _cfg(augment="paper", num_workers=0, epoch_batches=1))))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("skip", [1, 4])
def test_skip_batches_resumes_mid_epoch_exactly(dataset, skip):
    cfg = _cfg(augment="paper", epoch_batches=7)
    full = list(train_loader(dataset, 1, 2, cfg, epoch=1))
    resumed = list(train_loader(dataset, 1, 2, cfg, epoch=1, skip_batches=skip))
    assert len(full) == 7 and len(resumed) == 7 - skip == len(train_loader(dataset, 1, 2, cfg, 1, skip))
    for (a_img, a_lab, _), (b_img, b_lab, _) in zip(full[skip:], resumed):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)


def test_eval_loader_gives_aligned_masks_labels_and_keys(dataset):
    info = read_dataset(dataset)
    seen = 0
    for batch in eval_loader(dataset, 5, SIZE, num_workers=2):
        masks, labels = batch["masks"], batch["labels"]
        assert masks.shape == (len(batch["keys"]), SIZE, SIZE) and masks.dtype == torch.int64
        for mask, label in zip(masks, labels):
            present = {int(v) - 1 for v in mask.unique() if 0 < v < 255}
            assert present == set(torch.nonzero(label).flatten().tolist())
        seen += len(batch["keys"])
    assert seen == info.total_samples
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    restored = batch["images"][0] * std + mean
    assert restored.min() >= -0.02 and restored.max() <= 1.02


def test_eval_masks_are_ignore_when_dataset_has_none(tmp_path):
    uri = str(tmp_path / "nomask")
    source = build_source(SourceConfig(format="synthetic", num_images=3, num_classes=2, image_size=SIZE, masks=False))
    work = ingest.plan(source, 3)
    part = ingest.write_shard(source, ingest.ShardTask(0, work.groups[0], uri, source.class_names, "t"))
    ingest.finalize(uri, "x", source.class_names, [part], [], 3, {})
    batch = next(iter(eval_loader(uri, 3, 32)))
    assert (batch["masks"] == 255).all() and batch["images"].shape == (3, 3, 32, 32)


class _Flaky(io.RawIOBase):
    """A shard stream that breaks once after ``fail_at`` bytes, like a reset connection."""

    def __init__(self, data: bytes, fail_at: int | None):
        self.buffer, self.pos, self.fail_at = data, 0, fail_at

    def readable(self):
        return True

    def readinto(self, out):
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise ConnectionResetError("connection reset by peer")
        end = len(self.buffer) if self.fail_at is None else min(len(self.buffer), self.fail_at)
        n = min(len(out), end - self.pos)
        out[:n] = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return n


def test_s3_read_errors_resume_at_the_failed_shard(dataset, monkeypatch):
    url = shard_uris(dataset, read_dataset(dataset))[1]
    expected = [s["__key__"] for s in shard_samples(url)]
    data = storage.get_bytes(url)
    opens = []

    def flaky_open(u, mode="rb", bufsize=8192, **kw):
        opens.append(u)
        return io.BufferedReader(_Flaky(data, len(data) // 2 if len(opens) == 1 else None), buffer_size=512)

    monkeypatch.setitem(wds.gopen_schemes, "s3", flaky_open)
    got = [s["__key__"] for s in shard_samples(url, retries=3)]
    assert got == expected and len(opens) == 2


def test_persistent_read_errors_name_the_shard(dataset, monkeypatch):
    url = shard_uris(dataset, read_dataset(dataset))[0]

    def broken(u, mode="rb", bufsize=8192, **kw):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr("system.data.stream.time.sleep", lambda s: None)
    monkeypatch.setitem(wds.gopen_schemes, "s3", broken)
    with pytest.raises(OSError, match=f"reading shard {url} failed 2 times"):
        list(shard_samples(url, retries=2))


def test_s3_handler_is_registered_for_plain_webdataset(dataset):
    url = shard_uris(dataset, read_dataset(dataset))[0]
    samples = list(wds.WebDataset(url, shardshuffle=False, nodesplitter=wds.split_by_node))
    assert len(samples) == read_dataset(dataset).shards[0].samples and "jpg" in samples[0]


def test_too_few_shards_without_resampling_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match="cannot feed 8 ranks x 2 workers"):
        train_loader(dataset, 0, 8, _cfg(resampled=False))


def test_missing_dataset_is_a_clear_error(s3_root):
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        train_loader(s3_root, 0, 1, _cfg())


def test_paper_augmentation_survives_zero_bit_posterize():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from system.data.transforms import ImageTransform

    transform = ImageTransform("paper", 32)
    rand = next(t for t in transform.pipeline.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in rand.ops if op.name.startswith("Posterize"))
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    assert posterize(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    rand.ops = [posterize]
    assert transform(image).shape == (3, 32, 32)


def test_train_stream_skips_an_undecodable_sample(tmp_path, caplog):
    uri = str(tmp_path / "broken")
    build_dataset(uri, num_images=6, shard_size=6)
    shard = tmp_path / "broken" / "shard-000000.tar"
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_jpg = next(i for i, (name, _) in enumerate(members) if name.endswith(".jpg"))
    name, data = members[first_jpg]
    members[first_jpg] = (name, data[: len(data) // 3])
    with open(shard, "wb") as f:
        from system.data.shards import write_tar

        write_tar(f, [(n.split(".", 1)[0], [(n.split(".", 1)[1], d)]) for n, d in members])
    caplog.set_level("WARNING", logger="system.data.stream")
    batches = list(train_loader(uri, 0, 1, _cfg(resampled=False, num_workers=0, batch_size=2)))
    assert sum(images.shape[0] for images, _, _ in batches) == 5
    assert "skipping sample" in caplog.text


@pytest.mark.parametrize("size", [(320, 240), (1000, 50), (7, 7)])
def test_light_crops_follow_random_resized_crop(size):
    import random

    from system.data.transforms import resized_crop_box

    rng = random.Random(0)
    width, height = size
    fallback = {(width, round(width * 3 / 4)), (round(height * 4 / 3), height), (width, height)}
    boxes = [resized_crop_box(width, height, rng) for _ in range(200)]
    for left, top, right, bottom in boxes:
        w, h = right - left, bottom - top
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        if (w, h) in fallback:
            continue
        # torchvision's bounds: 8-100% of the area, aspect 3/4-4/3, up to rounding to whole pixels
        assert 0.08 * width * height <= (w + 0.5) * (h + 0.5) and w * h <= width * height
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4
    if size == (1000, 50):  # no 3/4-4/3 crop covers 8% of it: always torchvision's centre fallback
        assert set(boxes) == {(466, 0, 533, 50)}
    else:
        assert len(set(boxes)) > 50  # random, not one box


def test_stream_resize_matches_pil_bilinear():
    """The stream resizes with torch's uint8 kernel: within one grey level of PIL's BILINEAR, down
    and up, and the padding byte of RGBX never reaches the model."""
    import numpy as np
    from PIL import Image

    from system.data.transforms import ImageTransform, resize_pixels, rgbx_pixels

    rgb = (np.random.default_rng(1).random((120, 170, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    for size in (64, 301):
        ours = resize_pixels(rgbx_pixels(image), size)[..., :3].numpy().astype(int)
        pil = np.asarray(image.resize((size, size), Image.BILINEAR)).astype(int)
        assert np.abs(ours - pil).max() <= 1
    transform = ImageTransform("none", 64)
    finished = transform.finish(transform.collate([transform(image)]))
    expected = (
        torch.from_numpy(np.array(image.resize((64, 64), Image.BILINEAR))).permute(2, 0, 1) / 255
        - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert finished.shape == (1, 3, 64, 64)
    assert (finished[0] - expected).abs().max() <= 1.01 / (255 * min(IMAGENET_STD))


def test_random_streams_keep_the_numbers_their_seeds_were_made_with():
    # a renumbered stream would silently change every batch of every existing run on resume
    assert {s.name: s.value for s in Streams} == {
        "SHARD_DRAW": 1,
        "SHARD_ORDER": 2,
        "SHUFFLE": 3,
        "AUGMENT": 4,
        "LOADER": 5,
    }
    assert _mix(7, 0, Streams.SHARD_ORDER) == _mix(7, 0, 2)
    assert len({_mix(7, 0, 1, 0, s) for s in Streams}) == len(Streams)


def test_crop_scale_bounds_the_light_crop_and_bad_ranges_name_the_key():
    import random

    import numpy as np
    from PIL import Image

    from system.config import ConfigError, load_config
    from system.data.transforms import ImageTransform, resized_crop_box
    from system.training import TrainConfig

    rng = random.Random(0)
    areas = []
    for _ in range(200):
        left, top, right, bottom = resized_crop_box(200, 200, rng, (0.5, 1.0))
        areas.append((right - left) * (bottom - top) / 200**2)
    assert min(areas) >= 0.49 and max(areas) > 0.9
    # the whole image: a light crop is the plain resize, up to the flip
    image = Image.fromarray((np.random.default_rng(2).random((48, 48, 3)) * 255).astype(np.uint8))
    whole = ImageTransform("none", 32)(image)
    for seed in range(6):
        crop = ImageTransform("light", 32, (1.0, 1.0))(image, seed=seed)
        assert torch.equal(crop, whole) or torch.equal(crop, whole.flip(1))
    cfg = load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o", "stream.crop_scale=[0.3,1.0]"])
    assert cfg.stream.crop_scale == (0.3, 1.0)
    for bad in ("[0.0,1.0]", "[0.8,0.5]", "[0.5,1.5]", "[0.5]"):
        with pytest.raises(ConfigError, match="crop_scale"):
            load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o", f"stream.crop_scale={bad}"])


def test_the_run_seed_changes_the_data_order_as_well_as_the_init():
    from system.config import load_config
    from system.training import TrainConfig, stream_config

    def stream_seed(*overrides: str) -> int:
        cfg = load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o", *overrides])
        return stream_config(cfg, 10).seed

    assert stream_seed() == 0
    assert stream_seed("seed=1") != stream_seed("seed=2")
    assert stream_seed("seed=1", "stream.seed=5") == 6
