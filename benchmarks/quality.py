"""Quality of the tiny recipe over training seeds, and the ablation: is the recipe robust, does clustering help?

Runs the demo's steps (``pipelines.demo``: one embedded stack, one ingest) and then, per variant and
training seed, trains, labels the held-out split and evaluates it. Prints held-out mIoU of the
segmentation head's masks and of the CAM + PAR pseudo labels - mean, spread (max - min) and every
seed - next to the all-background baseline, and writes the results as JSON. Variants:

  clustercam      the recipe as configured: clustering blocks in every layer
  class-token     plain class-token attention, no clustering blocks (``model.st_depth=0``)
  clustercam-p2p  the clustercam models again, their CAMs refined along patch-to-patch attention at
                  labelling (``cam_p2p_refine=true``; the recipe trains and labels without it)

A finished run or label job under ``--dir`` is reused, so an interrupted benchmark resumes; ``--tag``
names the runs and labels, so a changed recipe (demo keys such as ``train=[...]``) needs a new tag.
``--models-of TAG`` labels the models another tag trained: a sweep of label-time settings
(``label=[bg_threshold=0.5]``) needs no training.

``--one-process`` is the recipe search's mode: no stack, no Ray, no DeepSpeed. The same splits are
ingested in-process into ``<dir>/one-process/``, each model is trained by
``system.training.train_one_process`` on the global batch (fp32, one rank: other data order, so not the
same numbers as the distributed run), and the held-out split is labelled by the labeller's own
``Labeller`` with the label config, in memory. One thread each, so two sweeps share a 2-core machine.
A recipe it picks is then measured the distributed way, which is what the README reports.

    python -m benchmarks.quality [--seeds 0,1,2] [--variants clustercam,class-token,clustercam-p2p]
                                 [--tag q] [--models-of TAG] [--json FILE] [--one-process] [demo key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from pipelines.demo import (
    DemoConfig,
    Paths,
    _json,
    background_baseline,
    evaluate_step,
    ingest_splits,
    label_step,
    start_stack,
    train_step,
)
from system.config import ConfigError, load_config, parse_cli
from system.data.shards import read_dataset
from system.data.stream import eval_loader
from system.label.config import LabelConfig
from system.label.infer import Labeller
from system.metrics import ConfusionMatrix
from system.telemetry import setup_logging
from system.training import TrainConfig, train_one_process
from tests.datasets import build_synthetic

log = logging.getLogger("benchmarks.quality")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    train: tuple[str, ...] = ()
    label: tuple[str, ...] = ()
    # the variant whose trained models this one labels again (a label-time switch needs no training)
    models_of: str | None = None


VARIANTS = {
    v.name: v
    for v in (
        Variant("clustercam"),
        Variant("class-token", train=("model.st_depth=0",)),
        Variant("clustercam-p2p", label=("cam_p2p_refine=true",), models_of="clustercam"),
    )
}


@dataclasses.dataclass
class SeedResult:
    variant: str
    seed: int
    seg_miou: float
    cam_miou: float | None
    seg_iou: dict[str, float | None]
    cam_iou: dict[str, float | None]
    train_s: float | None  # None: the trained model was reused
    label_s: float | None


@dataclasses.dataclass
class Row:
    variant: str
    seeds: list[int]
    seg: list[float]
    cam: list[float]

    @staticmethod
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": sum(values) / len(values), "spread": max(values) - min(values)} if values else {}


def run_one(
    base: DemoConfig, paths: Paths, env: dict[str, str], tags: tuple[str, str], variant: Variant, seed: int
) -> SeedResult:
    """Stages train, label and evaluate of one variant and training seed; ``tags``: (of the labels, of the models)."""
    tag, models_tag = tags
    trained_variant = VARIANTS[variant.models_of] if variant.models_of else variant
    cfg = dataclasses.replace(
        base,
        run_name=f"{models_tag}-{trained_variant.name}-s{seed}",
        train=[*base.train, f"seed={seed}", *trained_variant.train],
        label=[*base.label, *variant.label],
    )
    labels = dataclasses.replace(paths, labels_name=f"quality/{tag}-{variant.name}-s{seed}")
    train_s = train_step(cfg, labels, env)
    # a retrained model invalidates its earlier labels; the runs of a tag are only ever trained once
    label_s = label_step(cfg, labels, env, retrained=train_s is not None)
    result = evaluate_step(labels)
    cam = _json(labels.labels + "/label_job.json")["eval"].get("cam", {})
    return SeedResult(
        variant=variant.name,
        seed=seed,
        seg_miou=result["miou"],
        cam_miou=cam.get("miou"),
        seg_iou=result["iou"],
        cam_iou=cam.get("iou", {}),
        train_s=round(train_s, 1) if train_s is not None else None,
        label_s=round(label_s, 1) if label_s is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class OneProcess:
    """The demo's splits in a local folder, and the models of the seed being run (variants share them)."""

    root: Path
    models: dict = dataclasses.field(default_factory=dict)

    @property
    def train(self) -> str:
        return str(self.root / "train")

    @property
    def heldout(self) -> str:
        return str(self.root / "heldout")

    def ingest(self, base: DemoConfig) -> None:
        # the demo's splits: training scenes of synthetic seed 0, held-out scenes of seed 1
        for uri, images, seed in ((self.train, base.train_images, 0), (self.heldout, base.heldout_images, 1)):
            if not Path(uri, "dataset.json").is_file():
                build_synthetic(uri, images, base.num_classes, base.image_size, base.shard_size, seed)


def run_one_process(base: DemoConfig, data: OneProcess, variant: Variant, seed: int) -> SeedResult:
    """``run_one`` in this process: train (or reuse this seed's model of ``models_of``), label in memory, score."""
    trained_variant = VARIANTS[variant.models_of] if variant.models_of else variant
    train_s = None
    model = data.models.get((trained_variant.name, seed))
    if model is None:
        overrides = [f"data={data.train}", f"output={data.root}/runs", *base.train, f"seed={seed}"]
        overrides += trained_variant.train
        per_rank = load_config(TrainConfig, base.train_config, overrides)
        global_batch = base.num_workers * per_rank.stream.batch_size
        cfg = load_config(
            TrainConfig,
            base.train_config,
            [*overrides, "num_workers=1", f"stream.batch_size={global_batch}", "stream.num_workers=0"],
        )
        t0 = time.monotonic()
        model = data.models[(trained_variant.name, seed)] = train_one_process(cfg)
        train_s = round(time.monotonic() - t0, 1)
    label_cfg = load_config(
        LabelConfig, base.label_config, ["model=unused", "data=unused", "output=unused", *base.label, *variant.label]
    )
    class_names = read_dataset(data.heldout).classes
    labeller = Labeller(model, label_cfg, class_names)
    seg, cam = ConfusionMatrix(len(class_names) + 1), ConfusionMatrix(len(class_names) + 1)
    t0 = time.monotonic()
    for batch in eval_loader(data.heldout, label_cfg.batch_size, base.image_size):
        tags = batch["labels"].float()
        seg.add(batch["masks"], labeller.seg(batch["images"], tags, [])[0])
        cam.add(batch["masks"], labeller.cam(batch["images"], tags)[0])
    names = ["background", *class_names]
    return SeedResult(
        variant=variant.name,
        seed=seed,
        seg_miou=seg.miou(),
        cam_miou=cam.miou(),
        seg_iou=dict(zip(names, seg.iou().tolist())),
        cam_iou=dict(zip(names, cam.iou().tolist())),
        train_s=train_s,
        label_s=round(time.monotonic() - t0, 1),
    )


def rows(results: list[SeedResult]) -> list[Row]:
    out: dict[str, Row] = {}
    for r in results:
        row = out.setdefault(r.variant, Row(r.variant, [], [], []))
        row.seeds.append(r.seed)
        row.seg.append(r.seg_miou)
        if r.cam_miou is not None:
            row.cam.append(r.cam_miou)
    return list(out.values())


def table(results: list[SeedResult], baseline: float) -> str:
    """The report: one line per variant, mean / spread / per-seed mIoU for both mask kinds."""

    def cell(values: list[float]) -> str:
        if not values:
            return f"{'-':>32}"
        s = Row.stats(values)
        return f"{s['mean']:.3f} {s['spread']:.3f}  " + " ".join(f"{v:.3f}" for v in values)

    lines = [
        f"held-out mIoU over training seeds (all-background baseline {baseline:.3f})",
        f"{'variant':<16} {'seeds':<8} {'seg head: mean spread  per seed':<34} CAM + PAR: mean spread  per seed",
    ]
    for row in rows(results):
        seeds = ",".join(map(str, row.seeds))
        lines.append(f"{row.variant:<16} {seeds:<8} {cell(row.seg):<34} {cell(row.cam)}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Whole or not at all: a temp file renamed over the target."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    # `kill` unwinds as Ctrl-C does: the step running is stopped, then the stack
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=__doc__.split("\n\n")[-1])
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated: {', '.join(VARIANTS)}")
    parser.add_argument("--tag", default="q", help="prefix of the run names (a changed recipe needs a new one)")
    parser.add_argument("--models-of", default="", help="label the models this tag trained (default: --tag's)")
    parser.add_argument("--json", default="", help="results file; default <dir>/quality-<tag>.json")
    parser.add_argument(
        "--one-process", action="store_true", help="train and label in this process, one thread (recipe search)"
    )
    args, demo_args = parser.parse_known_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    base = parse_cli(DemoConfig, ["dir=.quality", *demo_args], prog="python -m benchmarks.quality")
    if args.one_process:  # the distributed steps check their keys themselves; here a typo would surface mid-run
        try:
            for variant in variants:
                load_config(TrainConfig, base.train_config, ["data=d", "output=o", *base.train, *variant.train])
                load_config(
                    LabelConfig, base.label_config, ["model=m", "data=d", "output=o", *base.label, *variant.label]
                )
        except ConfigError as exc:
            parser.error(str(exc))
    workdir = Path(base.dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else workdir / f"quality-{args.tag}.json"

    stages: dict[str, float] = {}
    results: list[SeedResult] = []
    t0 = time.monotonic()
    with ExitStack() as resources:
        if args.one_process:
            torch.set_num_threads(1)
            data = OneProcess(workdir / "one-process")
            data.ingest(base)
            baseline = background_baseline(data.heldout)["miou"]
        else:
            root, env, _ = start_stack(base, workdir, resources)
            stages["stack"] = time.monotonic() - t0
            paths = Paths(root)
            stages.update(ingest_splits(base, paths, env))
            baseline = background_baseline(paths.heldout_data)["miou"]
        # seed by seed, so that an interrupted benchmark has compared the variants on the seeds it ran
        for seed in seeds:
            if args.one_process:
                data.models.clear()
            for variant in variants:
                if args.one_process:
                    results.append(run_one_process(base, data, variant, seed))
                else:
                    tags = (args.tag, args.models_of or args.tag)
                    results.append(run_one(base, paths, env, tags, variant, seed))
                log.info("quality: %s", results[-1])
                write_json(
                    out,
                    {
                        "tag": args.tag,
                        "mode": "one-process" if args.one_process else "distributed",
                        "models_of": args.models_of or args.tag,
                        "demo": dataclasses.asdict(base),
                        "baseline_all_background_miou": baseline,
                        "variants": {
                            r.variant: {"seg": Row.stats(r.seg), "cam": Row.stats(r.cam)} for r in rows(results)
                        },
                        "runs": [dataclasses.asdict(r) for r in results],
                        "seconds": {
                            **{k: round(v, 1) for k, v in stages.items()},
                            "total": round(time.monotonic() - t0, 1),
                        },
                    },
                )
    print(table(results, baseline), flush=True)
    print(f"results: {out}", flush=True)


if __name__ == "__main__":
    main()
