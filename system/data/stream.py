"""The WebDataset stream that feeds training (per rank) and evaluation.

How a rank's batches are made: the shard list from ``dataset.json`` is shuffled with a seed that
depends on (seed, epoch), split by rank and then by DataLoader worker; raw (still encoded) samples
are shuffled in a buffer, decoded late, augmented, and batched inside the workers. With
``resampled`` (the training default) each worker draws shards at random with replacement and every
rank stops after exactly ``epoch_batches`` batches, so ranks never wait on each other at the end of
an epoch. Without it every sample is seen exactly once per epoch across all ranks and workers (the
last batch of a worker may be short).

The stages of a rank's stream, each a small function of ``_TrainStream``: shard order -> split by rank
and worker -> read samples -> shuffle -> skip (resume) -> decode and augment -> batch.

Determinism and resume: every random choice - shard order, shuffle buffer, augmentation - is seeded
from (seed, epoch, rank, worker role, sample number) and its own named random stream (``Streams``),
so the same call yields the same batches.
``skip_batches=n`` resumes mid-epoch: worker roles are rotated so that batch 0 of the resumed loader
is batch n of the original, and each worker drops its share of raw samples *before* decoding, so
skipping costs only reading. (Exact for resampled streams; without resampling it is exact while no
worker has run out of shards.)

Labels: each batch carries ``labels`` (B,K) multi-hot and ``known`` (B,K), 1 where the class's
label is known - a positive or a verified negative. A sample's ``known`` field lists them (partial
labels, as OpenImages has); without it every class is known, as for VOC, COCO and manifests.

A training sample whose image no longer decodes is skipped with a warning (ingest's checks make this
rare; a storage bit flip should not end a multi-day run); the eval stream raises instead, since a
missing sample would bias the evaluation.

S3 shards are opened through a boto3 handler registered as ``webdataset.gopen_schemes["s3"]`` (one
streaming GET per shard); a read that breaks mid-shard is reopened and resumes after the last sample
already delivered, instead of restarting the epoch.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import botocore.exceptions
import numpy as np
import torch
import urllib3.exceptions
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from system import storage
from system.config import option
from system.data.shards import DatasetInfo, group_samples, read_dataset, read_tar, shard_uris
from system.data.transforms import CROP_SCALE, Augment, ImageTransform, check_crop_scale, decode_rgb, resize_mask
from system.masks import decode_mask

log = logging.getLogger(__name__)
_IMAGE_EXTS = ("jpg", "png", "webp")
_RETRYABLE = (OSError, tarfile.ReadError, botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: the s3 handler only reads")
    return storage.open_read(url)


wds.gopen_schemes["s3"] = _gopen_s3


@dataclass
class StreamConfig:
    """How a rank reads its training batches."""

    batch_size: int = option(8, doc="images per batch per rank")
    image_size: int = option(448, doc="side S of the (S, S) crops")
    augment: Augment = option(
        "paper", doc="paper (docs/method.md §b.1) | light (crop + flip) | none (resize, deterministic)"
    )
    crop_scale: tuple[float, float] = option(
        CROP_SCALE,
        doc="area range of the random resized crop (paper and light); a crop that misses a tagged object still "
        "carries its tag, so small images with few objects want a higher lower bound",
    )
    num_workers: int = option(2, doc="DataLoader worker processes per rank (decode + augment)")
    shuffle_buffer: int = option(1000, doc="raw samples held for shuffling, per worker")
    seed: int = option(0, doc="base seed of shard order, shuffling and augmentation")
    resampled: bool = option(
        True, doc="draw shards with replacement and stop after epoch_batches (equal steps per rank)"
    )
    epoch_batches: int = option(0, doc="batches per rank per epoch; 0: total samples // (world size x batch size)")
    retries: int = option(5, doc="attempts to read a shard when the connection breaks")

    def __post_init__(self) -> None:
        check_crop_scale(self.crop_scale)


def epoch_batches(info: DatasetInfo, world_size: int, cfg: StreamConfig) -> int:
    if cfg.epoch_batches > 0:
        return cfg.epoch_batches
    return max(1, info.total_samples // (world_size * cfg.batch_size))


def shard_samples(url: str, retries: int = 5) -> Iterator[dict]:
    """Raw samples ({"__key__", "jpg", "json", ...}) of one shard, in order, each exactly once."""
    delivered = 0
    attempt = 0
    while True:
        try:
            with contextlib.closing(wds.gopen(url)) as stream:
                for index, sample in enumerate(group_samples(read_tar(stream))):
                    if index >= delivered:
                        delivered += 1
                        sample["__url__"] = url
                        yield sample
            return
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {url} is missing (dataset.json lists it)") from None
        except _RETRYABLE as exc:
            attempt += 1
            if attempt >= retries:
                raise OSError(f"reading shard {url} failed {attempt} times, last: {type(exc).__name__}: {exc}") from exc
            time.sleep(min(0.2 * 2**attempt, 5.0))


def _targets(sample: dict, num_classes: int) -> np.ndarray:
    """(2,K) float32: the multi-hot labels, then the known mask (all ones without a ``known`` field)."""
    meta = json.loads(sample["json"])
    targets = np.zeros((2, num_classes), dtype=np.float32)
    targets[0, meta["labels"]] = 1.0
    if "known" in meta:
        targets[1, meta["known"]] = 1.0
    else:
        targets[1] = 1.0
    return targets


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class Streams(enum.IntEnum):
    """The stream's independent random streams. Each value is mixed into its seeds: renumbering one
    changes every batch of every dataset."""

    SHARD_DRAW = 1  # resampled: a worker role's draws of shards, with replacement
    SHARD_ORDER = 2  # not resampled: the epoch's shard permutation, the same on every rank
    SHUFFLE = 3  # a worker role's shuffle buffer
    AUGMENT = 4  # one sample's crop, flip and colour jitter
    LOADER = 5  # the DataLoader's base seed


def _mix(*parts: int) -> int:
    """A 32-bit seed from integers (splitmix64 steps): cheap enough to run once per sample."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = ((x ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0xFFFFFFFF


def _as_is(batch):
    """The DataLoader's collate for ready batches (its default would turn NumPy arrays into tensors)."""
    return batch


class _BatchSlots:
    """Reusable shared-memory batch buffers, ``slots`` per DataLoader worker, made before the workers
    start: a worker stacks its batch into its next slot and sends only (worker, slot, size); the
    consumer finishes the batch straight from the slot.

    Without them the DataLoader moves every batch into a fresh shared-memory segment: the worker
    creates it, faults in its pages and copies the batch there, sends a file descriptor, and the
    consumer maps the segment again, CPU work per image that is a noticeable part of its decode.
    A semaphore per worker counts its free slots: a worker ``slots`` batches ahead of the consumer
    waits, and the consumer frees a slot once the batch is copied out (converted, or sent to the
    device). A worker's batches are consumed in order, so slot ``n % slots`` is free for batch n.
    The DataLoader's prefetch limit keeps a worker within its slots while all workers run; the
    semaphore matters when some have run dry and the DataLoader sends every request to the rest."""

    def __init__(self, workers: int, slots: int, batch_size: int, layout: tuple[tuple[int, ...], torch.dtype]):
        shape, dtype = layout
        self.slots = slots
        self.buffers = torch.empty((workers, slots, batch_size, *shape), dtype=dtype).share_memory_()
        self.reset()

    def reset(self) -> None:
        """Every slot free, for a new pass of the DataLoader (its workers start after this)."""
        self.free = [torch.multiprocessing.Semaphore(self.slots) for _ in range(self.buffers.shape[0])]

    def write(self, worker: int, number: int, items: list, collate) -> tuple[int, int, int]:
        self.free[worker].acquire()
        slot = number % self.slots
        collate(items, out=self.buffers[worker, slot, : len(items)])
        return worker, slot, len(items)

    def read(self, ref: tuple[int, int, int]) -> torch.Tensor:
        worker, slot, size = ref
        return self.buffers[worker, slot, :size]

    def release(self, ref: tuple[int, int, int]) -> None:
        self.free[ref[0]].release()

    def unblock(self) -> None:
        """Lets every waiting worker go when the consumer stops early (the DataLoader then stops
        them; one stuck in ``acquire`` would hold its shutdown for seconds)."""
        for free in self.free:
            for _ in range(self.slots):
                free.release()


class _TrainStream(IterableDataset):
    """One rank's training stream; everything random is keyed by the worker's *role* (see module doc)."""

    def __init__(
        self,
        urls,
        num_classes,
        rank,
        world_size,
        cfg: StreamConfig,
        epoch,
        skip_batches,
        batches,
        transform: ImageTransform,
        slots: _BatchSlots | None = None,
    ):
        self.urls, self.num_classes = urls, num_classes
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.epoch, self.skip, self.batches = epoch, skip_batches, batches
        self.transform, self.slots = transform, slots  # the consumer's own: workers inherit (or unpickle) it

    def _shards(self, role: int, roles: int) -> Iterator[str]:
        """Stages shard order and split: a worker role's shards (resampled: drawn at random, endless)."""
        if self.cfg.resampled:
            rng = random.Random(_mix(self.cfg.seed, self.epoch, self.rank, role, Streams.SHARD_DRAW))
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        random.Random(_mix(self.cfg.seed, self.epoch, Streams.SHARD_ORDER)).shuffle(order)
        yield from order[self.rank :: self.world_size][role::roles]

    def _read(self, urls: Iterator[str]) -> Iterator[dict]:
        """Stage read: the raw (still encoded) samples of each shard in turn."""
        return (sample for url in urls for sample in shard_samples(url, self.cfg.retries))

    def _shuffle(self, raw: Iterator[dict], role: int) -> Iterator[dict]:
        """Stage shuffle: raw samples through a buffer, before the costly decode."""
        bufsize = max(1, self.cfg.shuffle_buffer)
        rng = random.Random(_mix(self.cfg.seed, self.epoch, self.rank, role, Streams.SHUFFLE))
        return wds.shuffle(bufsize=bufsize, initial=min(100, bufsize), rng=rng)(raw)

    @staticmethod
    def _skip(raw: Iterator[dict], count: int) -> Iterator[tuple[int, dict]]:
        """Stage skip: numbers the shuffled samples and drops the first ``count`` undecoded (resume)."""
        return ((number, sample) for number, sample in enumerate(raw) if number >= count)

    def _decoded(self, numbered: Iterator[tuple[int, dict]], role: int) -> Iterator[tuple]:
        """Stage decode and augment, seeded by the sample's number; an unreadable sample is skipped."""
        for number, sample in numbered:
            try:
                item = self._decode(sample, _mix(self.cfg.seed, self.epoch, self.rank, role, Streams.AUGMENT, number))
            except (OSError, ValueError, SyntaxError) as exc:  # one broken image must not end a training run
                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
                continue
            yield item

    def _batched(self, items: Iterator[tuple], first: int, quota: float) -> Iterator[tuple]:
        """Stage batch: batches numbered from ``first``, up to ``quota``; a short last one when the shards end."""
        batch: list = []
        produced = first
        for item in items:
            batch.append(item)
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch, produced)
                batch = []
                produced += 1
                if produced >= quota:
                    return
        if batch:
            yield self._collate(batch, produced)

    def _decode(self, sample: dict, seed: int) -> tuple:
        ext = next((e for e in _IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ValueError(f"sample {sample['__key__']} in {sample['__url__']} has no image")
        image = decode_rgb(sample[ext], None if self.cfg.augment == "paper" else self.cfg.image_size)
        return self.transform(image, seed), _targets(sample, self.num_classes)

    def _collate(self, batch: list, number: int) -> tuple:
        # labels and known masks go back as a NumPy array, pickled by value: cheaper than a shared-memory
        # segment and the file-descriptor exchange a tensor costs
        items, targets = [b[0] for b in batch], np.stack([b[1] for b in batch])
        if self.slots is None:
            return self.transform.collate(items), targets
        return self.slots.write(_worker()[0], number, items, self.transform.collate), targets

    def __iter__(self):
        worker, roles = _worker()
        role = (worker + self.skip) % roles
        skipped_batches = len(range(role, self.skip, roles))  # this role's share of the resumed-over batches
        quota = len(range(role, self.batches, roles)) if self.cfg.resampled else math.inf
        if skipped_batches >= quota:
            return
        raw = self._shuffle(self._read(self._shards(role, roles)), role)
        numbered = self._skip(raw, skipped_batches * self.cfg.batch_size)
        yield from self._batched(self._decoded(numbered, role), skipped_batches, quota)


class Loader:
    """A DataLoader whose batches are finished (converted, normalised) in the consuming process."""

    def __init__(
        self,
        dataloader: DataLoader,
        transform: ImageTransform,
        batches: int | None,
        device: torch.device | None = None,
        slots: _BatchSlots | None = None,
    ):
        self.dataloader, self.transform, self.batches, self.device = dataloader, transform, batches, device
        self.slots = slots

    def _finish_slot(self, ref: tuple[int, int, int]) -> torch.Tensor:
        pixels = self.slots.read(ref)
        images = self.transform.finish(pixels, self.device)
        if images is pixels:  # a float batch on the CPU is already finished, but the slot is reused
            images = images.clone()
        self.slots.release(ref)
        return images

    def __iter__(self):
        if self.slots:
            self.slots.reset()  # a previous pass may have ended early and unblocked its workers
        try:
            for batch in self.dataloader:
                if isinstance(batch, dict):
                    yield batch | {"images": self.transform.finish(batch["images"], self.device)}
                    continue
                images, targets = batch
                images = self._finish_slot(images) if self.slots else self.transform.finish(images, self.device)
                targets = torch.from_numpy(targets)
                yield images, targets[:, 0], targets[:, 1]
        finally:
            if self.slots:
                self.slots.unblock()

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("the number of batches is only fixed for resampled streams")
        return self.batches


def train_loader(
    dataset_uri: str,
    rank: int,
    world_size: int,
    cfg: StreamConfig,
    epoch: int = 0,
    skip_batches: int = 0,
    device: torch.device | None = None,
) -> Loader:
    """``device``: where images are converted and normalised (uint8 batches cross PCIe, 4x fewer bytes
    than float ones, straight from the shared batch slot); labels stay on the CPU."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    info = read_dataset(dataset_uri)
    urls = shard_uris(dataset_uri, info)
    if not urls:
        raise ValueError(f"{dataset_uri}: the dataset has no shards")
    if not cfg.resampled and len(urls) < world_size * max(1, cfg.num_workers):
        raise ValueError(
            f"{dataset_uri}: {len(urls)} shards cannot feed {world_size} ranks x {cfg.num_workers} workers "
            "without resampling (set resampled=true or write smaller shards)"
        )
    batches = epoch_batches(info, world_size, cfg)
    transform = ImageTransform(cfg.augment, cfg.image_size, cfg.crop_scale)
    prefetch = 4
    # one slot per batch a worker may have in flight, plus the one being finished
    slots = (
        _BatchSlots(cfg.num_workers, prefetch + 1, cfg.batch_size, transform.item_layout()) if cfg.num_workers else None
    )
    stream = _TrainStream(
        urls, len(info.classes), rank, world_size, cfg, epoch, skip_batches, batches, transform, slots
    )
    # An own generator: DataLoader otherwise draws its base seed from the caller's global torch RNG.
    generator = torch.Generator().manual_seed(_mix(cfg.seed, epoch, rank, Streams.LOADER))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        generator=generator,
        collate_fn=_as_is,
        prefetch_factor=prefetch if cfg.num_workers else None,
        persistent_workers=False,
    )
    return Loader(loader, transform, max(0, batches - skip_batches) if cfg.resampled else None, device, slots)


class _EvalStream(IterableDataset):
    def __init__(self, urls, num_classes, batch_size, transform: ImageTransform, rank, world_size):
        self.urls, self.num_classes, self.batch_size, self.transform = urls, num_classes, batch_size, transform
        self.rank, self.world_size = rank, world_size

    def _decode(self, sample: dict) -> tuple:
        ext = next(e for e in _IMAGE_EXTS if e in sample)
        image = self.transform(decode_rgb(sample[ext]))
        targets = _targets(sample, self.num_classes)
        size = self.transform.size
        if "mask.png" in sample:
            mask = torch.from_numpy(resize_mask(decode_mask(sample["mask.png"]), size).astype(np.int64))
        else:
            mask = torch.full((size, size), 255, dtype=torch.int64)
        return image, targets, mask, sample["__key__"]

    def __iter__(self):
        worker, workers = _worker()
        urls = self.urls[self.rank :: self.world_size][worker::workers]
        batch: list = []
        for url in urls:
            for sample in shard_samples(url):
                batch.append(self._decode(sample))
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: list) -> dict:
        images, targets, masks, keys = zip(*batch)
        targets = torch.from_numpy(np.stack(targets))
        return {
            "images": self.transform.collate(list(images)),
            "labels": targets[:, 0],
            "known": targets[:, 1],
            "masks": torch.stack(masks),
            "keys": list(keys),
        }


def eval_loader(
    dataset_uri: str, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> Loader:
    info = read_dataset(dataset_uri)
    transform = ImageTransform("none", image_size)
    stream = _EvalStream(shard_uris(dataset_uri, info), len(info.classes), batch_size, transform, rank, world_size)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    return Loader(loader, transform, None)
