"""Ingest throughput against a plain tar copy of the same bytes, both writing to the same S3 server.

    python -m benchmarks.ingest [--images 2000] [--size 320] [--shard-size 250] [--workers 2] [--rounds 3]

The baseline reads every source file and writes it unchanged into tar shards on the same storage, in
one process: the I/O floor of any ingest. It runs right before every ingest, and the ratio is the
median over rounds of the two, because this machine's speed drifts by more than the gaps measured.
The ingest is the real pipeline (manifest source, Ray tasks,
image checks, deterministic tars, part records, dataset.json). Ray start-up and worker start are
excluded (a warm-up ingest runs first): they are a fixed cost that vanishes at dataset scale.
"per core" is images per CPU-second of every process involved - the driver and all of Ray's
processes (raylet, GCS, workers) for the ingest, the one process for the copy - with the S3 server
left out of both, so the figure holds on a busy machine. Target: ingest images/s per core >= 0.5x
the baseline's, with the default checks (``verify=structure``); ``verify=decode`` is printed for
reference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.cputime import CpuClock
from pipelines.ingest import IngestConfig, run
from pipelines.stack import start_s3
from system import storage
from system.data.sources import SourceConfig
from system.data.sources.synthetic import class_names, render


def make_inputs(folder: Path, count: int, size: int) -> Path:
    names = class_names(6)
    lines = []
    for i in range(count):
        image, _, classes = render(i, 6, size, seed=1)
        (folder / f"{i:06d}.jpg").write_bytes(image)
        lines.append(json.dumps({"id": f"img{i:06d}", "image": f"{i:06d}.jpg", "labels": [names[k] for k in classes]}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def tar_copy(folder: Path, count: int, shard_size: int, output: str) -> None:
    files = sorted(folder.glob("*.jpg"))[:count]
    for start in range(0, len(files), shard_size):
        with storage.open_write(storage.join(output, f"copy-{start // shard_size:06d}.tar")) as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for path in files[start : start + shard_size]:
                    data = path.read_bytes()
                    info = tarfile.TarInfo(path.name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3, help="copy + ingest pairs per setting (medians)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = start_s3(tmp / "s3", buckets=("bench",))
        os.environ.update(server.env())
        try:
            (tmp / "in").mkdir()
            manifest = make_inputs(tmp / "in", args.images, args.size)
            total_mb = sum(p.stat().st_size for p in (tmp / "in").glob("*.jpg")) / 2**20
            print(
                f"{args.images} JPEGs of {args.size}x{args.size}, {total_mb:.1f} MiB, shards of {args.shard_size}, "
                f"{args.workers} ingest workers, S3 at {server.endpoint}"
            )
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)

            clock = CpuClock(exclude=(server.pid,))

            def ingest(
                output: str, path: Path, workers: int, shard_size: int = args.shard_size, verify: str = "structure"
            ) -> tuple[float, float]:
                t0, c0 = time.perf_counter(), clock.now()
                run(
                    IngestConfig(
                        output=output,
                        source=SourceConfig(format="manifest", path=str(path)),
                        shard_size=shard_size,
                        num_workers=workers,
                        verify=verify,
                        progress_every_s=1e9,
                    )
                )
                return args.images / (time.perf_counter() - t0), args.images / (clock.now() - c0)

            warm = tmp / "in" / "warm.jsonl"
            warm.write_text("\n".join(manifest.read_text().splitlines()[: args.workers * 2]) + "\n")
            ingest("s3://bench/warm", warm, args.workers, shard_size=2)

            def copy(output: str) -> float:
                c0 = clock.now()
                tar_copy(tmp / "in", args.images, args.shard_size, output)
                return args.images / (clock.now() - c0)

            runs = 0
            for verify in ("structure", "decode"):
                for workers in sorted({1, args.workers}):
                    rounds = []
                    for _ in range(args.rounds):  # the baseline next to each run: this machine's speed drifts
                        runs += 1
                        base = copy("s3://bench/copy")
                        rounds.append((base, *ingest(f"s3://bench/ingest-{runs}", manifest, workers, verify=verify)))
                    base, rate, per_core = (statistics.median(r[i] for r in rounds) for i in range(3))
                    ratio = statistics.median(r[2] / r[0] for r in rounds)
                    target = " (target >= 0.5x)" if verify == "structure" else ""
                    print(
                        f"ingest verify={verify:9s}, {workers} worker(s): {rate:5.0f} images/s "
                        f"{per_core:5.0f} images/s/core; "
                        f"tar copy {base:5.0f} images/s/core; ratio {ratio:.2f}x per core{target}"
                    )
        finally:
            ray.shutdown()
            server.stop()


if __name__ == "__main__":
    main()
