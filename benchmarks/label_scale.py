"""The labelling control plane at scale: plan, a finished job's re-run and the final pass with N masks.

    .venv/bin/python -m benchmarks.label_scale [--images 100000] [--per-unit 1000] [--work DIR] [--keep]

Builds (not measured) a finished job on the local filesystem: a dataset.json of N / per-unit shards
whose shard files are garbage (so a re-run that read one would fail), a tiny exported model, N mask
files (one real palette PNG with its embedded stats line, hard-linked under N real names) and one
real unit record + images file per unit, built by ``system.label.records.build_record`` from
synthetic stats lines (K=20, 1-3 tags, GT confusion cells) exactly as an actor builds them.
A manifest of N rows is written as well, to measure its streamed planning.

Then each phase runs in a fresh process and reports its driver peak memory above its imports
(``ru_maxrss`` minus the RSS after imports), CPU seconds and wall time:

- ``plan``: ``plan_inputs`` over the dataset plus the one listing of ``units/``;
- ``plan_manifest``: ``plan_inputs`` over the N-row manifest, drawing every chunk;
- ``manifest_source``: ``ManifestSource`` alone reading the same manifest's entries once (its own
  share of ``plan_manifest``'s memory: its constructor parses the whole file);
- ``plan_manifest_streamed``: ``plan_manifest`` with a stand-in for the streaming ``ManifestSource``
  (another change): no pre-read in the constructor and JSON lines read line by line from the file
  rather than as one string; what is left is the planner's own memory;
- ``final``: ``finalize_outputs`` (every record summed, the quality report);
- ``rerun``: ``pipelines.label.run`` on the finished job (the whole re-run, label_job.json written).

The actor resume state is the largest ``UnitTask`` an actor receives, measured as its JSON size
(a shard unit and a manifest chunk of the default 256 rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHASES = ("plan", "plan_manifest", "manifest_source", "plan_manifest_streamed", "final", "rerun")
K = 20
LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one inode


def _names() -> list[str]:
    return [f"class{k:02d}" for k in range(K)]


def _line(key: str, rng: np.random.Generator, names: list[str]) -> dict:
    tags = sorted(rng.choice(K, size=int(rng.integers(1, 4)), replace=False).tolist())
    fractions = rng.dirichlet(np.ones(len(tags) + 1)).round(6)
    present = ["background", *(names[t] for t in tags)]
    return {
        "key": key,
        "id": key,
        "model": "bench",
        "run": "bench-run",
        "mode": "seg",
        "width": 500,
        "height": 375,
        "model_size": [500, 375],
        "tags": [names[t] for t in tags],
        "source": "bench",
        "classes": present[1:],
        "fractions": dict(zip(present, fractions.tolist())),
        "confidence": round(float(rng.uniform(0.4, 1.0)), 5),
        "class_confidence": {n: round(float(rng.uniform(0.3, 1.0)), 5) for n in present},
        "confusion": _confusion(tags),
    }


def _confusion(tags: list[int]) -> list[list[int]]:
    return [[0, 0, 120000], *([t + 1, t + 1, 40000] for t in tags), *([t + 1, 0, 2500] for t in tags)]


def build(work: Path, images: int, per_unit: int) -> dict:
    """A finished job with ``images`` masks under ``work``; returns the paths the phases use."""
    from system import storage
    from system.data.ingest import finalize
    from system.data.shards import shard_name
    from system.label.config import LabelConfig
    from system.label.inputs import plan_inputs
    from system.label.records import build_record, write_record
    from system.masks import mask_codec
    from system.model import build_clustercam, export_model

    names = _names()
    data, out, model = work / "data", work / "out", work / "model"
    parts = []
    for index in range(-(-images // per_unit)):
        n = min(per_unit, images - index * per_unit)
        storage.put_bytes(str(data / shard_name(index)), b"a shard a re-run must never read")
        parts.append({"name": shard_name(index), "samples": n, "masks": n, "bytes": 32, "sha256": f"{index:064x}"})
        parts[-1]["rejects"] = []
    finalize(str(data), "bench", names, parts, [], images, {"format": "bench"})
    export_model(
        build_clustercam(num_classes=K, embed_dim=48, depth=2, num_heads=6, img_size=64, decoder_channels=64),
        str(model),
        class_names=names,
        run_id="bench",
    )
    cfg = LabelConfig(model=str(model), data=str(data), output=str(out), precision="fp32")
    rng = np.random.default_rng(0)
    masks = out / "masks"
    masks.mkdir(parents=True)
    mask = np.zeros((375, 500), np.uint8)
    mask[100:200, 100:300] = 3
    png = mask_codec("png").encode(mask, _line("template", rng, names))
    plan = plan_inputs(str(data), K, names, cfg.manifest_chunk)
    start = 0
    for unit in plan.units:
        keys = [f"img{start + i:08d}" for i in range(unit.images)]
        start += unit.images
        for i, key in enumerate(keys, start=start - unit.images):
            template = masks.parent / f"template-{i // LINKS_PER_FILE}.png"
            if i % LINKS_PER_FILE == 0:
                template.write_bytes(png)
            os.link(template, masks / f"{key}.png")
        lines = [_line(key, rng, names) for key in keys]
        record, rows = build_record(unit.ref, unit.uri, "bench-run", cfg.modes, names, lines, keys, [], [], 0)
        write_record(str(out), unit.ref, record, rows)
    manifest = work / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i in range(images):
            tags = [names[t] for t in rng.choice(K, size=2, replace=False)]
            f.write(json.dumps({"id": f"img{i:08d}", "image": f"images/{i}.jpg", "labels": tags}) + "\n")
    paths = {"data": str(data), "out": str(out), "model": str(model), "manifest": str(manifest)}
    (work / "paths.json").write_text(json.dumps(paths))
    return paths


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def phase(name: str, work: Path) -> dict:
    """One phase in this process: imports first, then the measured work."""
    from benchmarks.cputime import CpuClock
    from pipelines.label import run
    from system.data.sources import SourceConfig
    from system.data.sources.manifest import ManifestSource
    from system.label.config import LabelConfig
    from system.label.inputs import plan_inputs
    from system.label.outputs import PlannedUnit, finalize_outputs
    from system.label.records import list_units
    from workers.label import UnitTask

    paths = json.loads((work / "paths.json").read_text())
    cfg = LabelConfig(model=paths["model"], data=paths["data"], output=paths["out"], precision="fp32")
    names = _names()
    base, clock = _rss(), CpuClock()
    cpu0, wall0 = clock.now(), time.monotonic()
    extra: dict = {}
    if name == "plan":
        plan = plan_inputs(cfg.data, K, names, cfg.manifest_chunk)
        listing = list_units(cfg.output)
        done = sum(listing.done(u.ref) for u in plan.units)
        task = UnitTask(plan.units[0], plan.units[0].ref, True)
        extra = {"units": len(plan.units), "done": done, "resume_state_bytes": _json_size(task)}
    elif name in ("plan_manifest", "plan_manifest_streamed"):
        if name == "plan_manifest_streamed":
            ManifestSource.__init__, ManifestSource._rows = _streaming_init, _streaming_rows
        plan = plan_inputs(paths["manifest"], K, names, cfg.manifest_chunk)
        units, first = 0, None
        for unit in plan.units:
            units += 1
            first = first or unit  # every chunk but the last holds manifest_chunk rows: the first is the largest
        extra = {"units": units, "resume_state_bytes": _json_size(UnitTask(first, first.ref, True))}
    elif name == "manifest_source":
        source = ManifestSource(SourceConfig(format="manifest", path=paths["manifest"], classes=names))
        extra = {"entries": sum(1 for _ in source.entries())}
    elif name == "final":
        plan = plan_inputs(cfg.data, K, names, cfg.manifest_chunk)
        final = finalize_outputs(cfg, names, [PlannedUnit(u.ref, u.images) for u in plan.units])
        extra = {"masks": final["masks"], "missing": final["missing"], "units": final["units_done"]}
    else:
        job = run(cfg)
        extra = {"complete": job["complete"], "written": job["counts"]["written"], "masks": job["counts"]["masks"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "phase": name,
        "peak_mb_above_imports": round((peak - base) / 2**20, 1),
        "cpu_s": round(clock.now() - cpu0, 2),
        "wall_s": round(time.monotonic() - wall0, 2),
        **extra,
    }


def _streaming_init(self, cfg) -> None:
    """``ManifestSource.__init__`` without the pre-read (classes given, so none are collected)."""
    self.cfg, self.path = cfg, cfg.path
    self.base = self.path.rsplit("/", 1)[0] if "/" in self.path else "."
    self.class_names = list(cfg.classes)


def _streaming_rows(self):
    """``ManifestSource._rows`` for JSON lines, one line at a time from the stream."""
    from system import storage

    with storage.open_read(self.path) as f:
        for line, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
            if raw.strip():
                yield line, json.loads(raw)


def _json_size(task) -> int:
    return len(json.dumps(dataclasses.asdict(task), default=str).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--per-unit", type=int, default=1000, help="images per shard (one unit each)")
    parser.add_argument("--work", default="", help="folder to build in (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the built job")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.work))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="label-scale-"))
    try:
        if not (work / "paths.json").exists():
            t0 = time.monotonic()
            build(work, args.images, args.per_unit)
            print(f"built {args.images} masks in {time.monotonic() - t0:.0f} s under {work}", file=sys.stderr)
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        results = {"images": args.images, "per_unit": args.per_unit}
        for name in PHASES:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.label_scale", "--phase", name, "--work", str(work)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[name]), file=sys.stderr)
        print(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
