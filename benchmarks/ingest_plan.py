"""Driver memory of ingest planning: an OpenImages-format set and a manifest, per image.

    python -m benchmarks.ingest_plan [--images 100000] [--rows-per-image 3.3] [--folder DIR]

Planning is what the ingest driver does before any task runs: build the source (class lists), list
every entry, refuse duplicates, cut and spool the shard groups with their fingerprints
(``system.data.ingest.plan``, as ``pipelines.ingest`` calls it). Each case runs in a fresh process;
the figure is its peak resident memory (``ru_maxrss``) minus its resident memory after the imports,
divided by the images. Image files are not written: planning never opens them. Target: at most
150 bytes per image at 1M images (3.3M label rows) and for a 1M-line manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_CLASSES = 600
SHARD_SIZE = 1000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_openimages(folder: Path, images: int, rows_per_image: float) -> None:
    """Classes, and a labels CSV sorted by ImageID with ~``rows_per_image`` rows each (70% positives)."""
    rng = random.Random(0)
    mids = [f"/m/0{k:05d}" for k in range(NUM_CLASSES)]
    (folder / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f"{m},Class {k}\n" for k, m in enumerate(mids))
    )
    with open(folder / "oidv7-train-annotations-human-imagelabels.csv", "w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        extra = rows_per_image - 1
        for i in range(images):
            count = 1 + int(extra) + (rng.random() < extra - int(extra))
            for mid in rng.sample(mids, count):
                f.write(f"{i:016x},verification,{mid},{int(rng.random() < 0.7)}\n")


def make_manifest(folder: Path, images: int) -> None:
    rng = random.Random(1)
    names = [f"class{k}" for k in range(20)]
    with open(folder / "manifest.jsonl", "w") as f:
        for i in range(images):
            labels = rng.sample(names, rng.randint(1, 3))
            f.write(json.dumps({"id": f"img{i:08d}", "image": f"images/{i:08d}.jpg", "labels": labels}) + "\n")


def measure(case: str, folder: str, images: int) -> dict:
    """Runs in its own process: plan one case and report its memory above the imports."""
    from system.data import ingest
    from system.data.sources import SourceConfig, build_source

    base = rss_bytes()
    t0 = time.perf_counter()
    if case == "openimages":
        cfg = SourceConfig(format="openimages", path=folder, split="train")
    else:
        cfg = SourceConfig(format="manifest", path=os.path.join(folder, "manifest.jsonl"))
    source = build_source(cfg)
    work = ingest.plan(source, SHARD_SIZE, {"source": vars(cfg)})
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    accepted = sum(work.groups.sizes)
    work.groups.close()
    return {
        "case": case,
        "images": images,
        "accepted": accepted,
        "shards": len(work.groups),
        "rejects": len(work.rejects),
        "plan_s": round(seconds, 1),
        "peak_above_imports_mb": round((peak - base) / 2**20, 1),
        "bytes_per_image": round((peak - base) / images),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--rows-per-image", type=float, default=3.3)
    parser.add_argument("--folder", default="", help="where the inputs are written (default: a temporary folder)")
    parser.add_argument("--measure", choices=["openimages", "manifest"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, args.images)))
        return
    with tempfile.TemporaryDirectory(dir=args.folder or None) as tmp:
        folder = Path(tmp)
        make_openimages(folder, args.images, args.rows_per_image)
        make_manifest(folder, args.images)
        rows = sum(1 for _ in open(folder / "oidv7-train-annotations-human-imagelabels.csv")) - 1
        print(f"{args.images} images, {rows} label rows, {args.images} manifest lines")
        print(f"{'case':<12}{'images':>10}{'shards':>8}{'plan s':>8}{'peak MB':>9}{'B/image':>9}")
        for case in ("openimages", "manifest"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.ingest_plan", "--measure", case, "--folder", tmp]
                + ["--images", str(args.images)],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{case:<12}{r['accepted']:>10}{r['shards']:>8}{r['plan_s']:>8}"
                f"{r['peak_above_imports_mb']:>9}{r['bytes_per_image']:>9}"
            )


if __name__ == "__main__":
    main()
