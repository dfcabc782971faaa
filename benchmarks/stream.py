"""Training-stream throughput against bare JPEG decode + resize of the same images.

    python -m benchmarks.stream [--images 1500] [--size 320] [--crop 224] [--workers 2] [--batch 32] [--rounds 3]
                                [--shard-size 250]

The baseline decodes each JPEG (already in memory) with PIL and resizes it to crop x crop with PIL in
one process: the work no stream can avoid, done the usual way. A second baseline does the same with
the stream's own resize (torch's uint8 kernel, faster than PIL's), so the ratio against it is
the stream machinery alone. Both run right before every stream epoch, and ratios are medians over
rounds, because this machine's speed drifts by more than the gaps measured.

The stream reads the same images as shards from the S3 server and runs the whole path (shard split,
S3 read, shuffle buffer, late decode, transform, batching in DataLoader workers, normalise) for one
epoch without resampling, so every image is processed once. "per core" is images per CPU-second of
every process involved (main process and loader workers; the S3 server excluded), so it holds on a
busy machine; wall-clock rates are printed too. Rates count from the first batch on: starting the
loader workers is a fixed cost per epoch, printed apart, that an epoch of a real dataset amortises
and a 1500-image run would not. The main process runs torch with one thread: it stands in for a
trainer, and OpenMP threads spinning on a shared 2-core machine would otherwise be billed to the
stream. Target: >= 0.8x the first baseline per core (augment none / light); ``paper`` adds
RandAugment and erasing, work neither baseline does, and is printed for reference.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.cputime import CpuClock
from pipelines.stack import start_s3
from system import storage
from system.data import ingest
from system.data.shards import read_dataset, shard_uris
from system.data.sources import SourceConfig, build_source
from system.data.stream import StreamConfig, train_loader
from system.data.transforms import resize_pixels, rgbx_pixels


def build(uri: str, images: int, size: int, shard_size: int = 250) -> None:
    source = build_source(SourceConfig(format="synthetic", num_images=images, num_classes=6, image_size=size, seed=4))
    work = ingest.plan(source, shard_size)
    parts = [
        ingest.write_shard(source, ingest.ShardTask(i, g, uri, source.class_names, "bench"))
        for i, g in enumerate(work.groups)
    ]
    ingest.finalize(uri, "bench", source.class_names, parts, work.rejects, work.inputs, {})


def jpegs(uri: str) -> list[bytes]:
    out = []
    for shard in shard_uris(uri, read_dataset(uri)):
        with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(shard))) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="baseline + stream pairs per augmentation (medians)")
    parser.add_argument(
        "--shard-size", type=int, default=250, help="images per shard (ingest writes 1000; each shard costs one S3 GET)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_s3(Path(tmp) / "s3", buckets=("bench",))
        os.environ.update(server.env())
        try:
            uri = "s3://bench/ds"
            build(uri, args.images, args.size, args.shard_size)
            data = jpegs(uri)
            print(
                f"{len(data)} JPEGs of {args.size}x{args.size} in {len(read_dataset(uri).shards)} shards on "
                f"{server.endpoint}; crops {args.crop}, batch {args.batch}, {args.workers} loader workers"
            )
            clock = CpuClock(exclude=(server.pid,))

            def bare(resize) -> float:
                c0 = clock.now()
                for jpeg in data:
                    resize(Image.open(io.BytesIO(jpeg)).convert("RGB"))
                return len(data) / (clock.now() - c0)

            def pil_resize(image: Image.Image):
                return image.resize((args.crop, args.crop), Image.BILINEAR)

            def torch_resize(image: Image.Image):
                return resize_pixels(rgbx_pixels(image), args.crop)

            def stream(augment: str) -> tuple[float, float, float, float]:
                cfg = StreamConfig(
                    batch_size=args.batch,
                    image_size=args.crop,
                    augment=augment,
                    num_workers=args.workers,
                    shuffle_buffer=500,
                    resampled=False,
                )
                t0, c0 = time.perf_counter(), clock.now()
                batches = iter(train_loader(uri, 0, 1, cfg))
                next(batches)
                t1, c1 = time.perf_counter(), clock.now()  # workers up, first batch out: the per-epoch start-up
                seen = sum(images.shape[0] for images, _, _ in batches)
                return seen / (time.perf_counter() - t1), seen / (clock.now() - c1), t1 - t0, c1 - c0

            for augment in ("none", "light", "paper"):
                rounds = []
                for _ in range(args.rounds):  # the baselines next to each run: this machine's speed drifts
                    rounds.append((bare(pil_resize), bare(torch_resize), *stream(augment)))
                base, same, rate, per_core, start, start_cpu = (
                    statistics.median(r[i] for r in rounds) for i in range(6)
                )
                ratio = statistics.median(r[3] / r[0] for r in rounds)
                machinery = statistics.median(r[3] / r[1] for r in rounds)
                target = "" if augment == "paper" else " (target >= 0.8x)"
                print(
                    f"stream augment={augment:5s}: {rate:5.0f} images/s {per_core:5.0f} images/s/core; "
                    "bare decode + PIL "
                    f"resize {base:5.0f} images/s/core, ratio {ratio:.2f}x{target}; bare decode + the stream's resize "
                    f"{same:5.0f} images/s/core, ratio {machinery:.2f}x; start-up {start:.1f} s, {start_cpu:.1f} CPU-s"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
