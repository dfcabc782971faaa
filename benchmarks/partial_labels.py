"""Partial labels on synthetic scenes: the partial-label loss against treating unknowns as negatives.

    python -m benchmarks.partial_labels [--images 480] [--classes 6] [--epochs 12] [--seeds 0]

Three runs of the same tiny recipe (configs/tiny.yaml's rate with the earlier tiny model's 16 px patches,
classification phase only, ``system.training.train_one_process`` on the CPU), each scored by the CAM + PAR
mIoU of held-out scenes (``system.training.cam_labels``, as the validator measures it):

- ``full``: every label known (the synthetic source's complete tags);
- ``partial``: the same scenes with partial labels, trained with the partial-label loss
  (``schedule.unknown_labels=ignore``);
- ``as negatives``: the same partial labels, unknowns counted as absent
  (``schedule.unknown_labels=negative``).

Partial labels imitate OpenImages, whose unverified classes include objects that are present: for
each image, every absent class is unknown with probability ``--hide-negatives`` (0.3), and every
present class but the first is unknown with probability ``--hide-positives`` (0.3), so an image keeps
at least one verified positive. Target: ``partial`` within 0.03 of ``full``, ``as negatives``
measurably below.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import tempfile
import time

import torch

from system.config import load_config
from system.data import ingest
from system.data.shards import DatasetInfo
from system.data.sources import Entry, Loaded, Source, SourceConfig, build_source
from system.data.stream import eval_loader
from system.metrics import ConfusionMatrix
from system.model import ClusterCAM
from system.training import TrainConfig, cam_labels, train_one_process


def _draw(*parts: object) -> float:
    """A uniform draw in [0, 1) fixed by ``parts`` (the same scene hides the same labels in every run)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclasses.dataclass
class PartialSource:
    """A source whose labels are made partial: some negatives and some positives become unknown."""

    inner: Source
    hide_negatives: float
    hide_positives: float

    @property
    def class_names(self) -> list[str]:
        return self.inner.class_names

    def entries(self):
        return self.inner.entries()

    def load(self, entry: Entry) -> Loaded:
        loaded = self.inner.load(entry)
        positives = [n for i, n in enumerate(loaded.labels) if i == 0 or _draw(entry.id, n) >= self.hide_positives]
        negatives = [
            n for n in self.class_names if n not in loaded.labels and _draw(entry.id, n) >= self.hide_negatives
        ]
        return Loaded(loaded.image, loaded.mask, tuple(positives), tuple(negatives))


def write_dataset(uri: str, source: Source, shard_size: int = 40) -> DatasetInfo:
    work = ingest.plan(source, shard_size)
    parts = [
        ingest.write_shard(source, ingest.ShardTask(i, g, uri, source.class_names, "bench"))
        for i, g in enumerate(work.groups)
    ]
    work.groups.close()
    return ingest.finalize(uri, "bench", source.class_names, parts, work.rejects, work.inputs, {})


@torch.no_grad()
def cam_miou(model: ClusterCAM, cfg: TrainConfig, heldout: str, num_classes: int) -> float:
    matrix = ConfusionMatrix(num_classes + 1)
    for batch in eval_loader(heldout, 16, cfg.stream.image_size):
        matrix.add(batch["masks"], cam_labels(model, batch["images"], batch["labels"], cfg.schedule))
    return matrix.miou()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--heldout", type=int, default=96)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--hide-negatives", type=float, default=0.3)
    parser.add_argument("--hide-positives", type=float, default=0.3)
    parser.add_argument("--depth", type=int, default=12, help="transformer blocks (the earlier tiny model's 12)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="partial-labels-") as tmp:
        synthetic = build_source(
            SourceConfig(format="synthetic", num_images=args.images, num_classes=args.classes, image_size=64, seed=3)
        )
        write_dataset(f"{tmp}/full", synthetic)
        write_dataset(f"{tmp}/partial", PartialSource(synthetic, args.hide_negatives, args.hide_positives))
        heldout = build_source(
            SourceConfig(format="synthetic", num_images=args.heldout, num_classes=args.classes, image_size=64, seed=9)
        )
        write_dataset(f"{tmp}/heldout", heldout)
        runs = [("full", "full", "ignore"), ("partial", "partial", "ignore"), ("as negatives", "partial", "negative")]
        print(
            f"{args.images} scenes, {args.classes} classes, depth {args.depth}, {args.epochs} epochs; unknown: "
            f"{args.hide_negatives:.0%} of negatives, {args.hide_positives:.0%} of positives after the first"
        )
        print(f"{'run':<14}{'seed':>5}{'CAM mIoU':>10}{'train s':>9}")
        results: dict[str, list[float]] = {}
        for seed in args.seeds:
            for name, data, unknown in runs:
                cfg = load_config(
                    TrainConfig,
                    "configs/tiny.yaml",
                    [
                        f"data={tmp}/{data}",
                        f"output={tmp}/out",
                        f"seed={seed}",
                        "num_workers=1",
                        f"model.num_classes={args.classes}",
                        f"model.depth={args.depth}",
                        "model.patch_size=16",  # the shape its figures were measured with
                        "stream.batch_size=16",
                        "stream.num_workers=0",
                        f"schedule.epochs={args.epochs}",
                        f"schedule.seg_start_epoch={args.epochs}",
                        f"schedule.unknown_labels={unknown}",
                    ],
                )
                t0 = time.perf_counter()
                model = train_one_process(cfg)
                seconds = time.perf_counter() - t0
                miou = cam_miou(model, cfg, f"{tmp}/heldout", args.classes)
                results.setdefault(name, []).append(miou)
                print(f"{name:<14}{seed:>5}{miou:>10.3f}{seconds:>9.0f}", flush=True)
        if len(args.seeds) > 1:
            for name, values in results.items():
                print(f"{name:<14}{'mean':>5}{sum(values) / len(values):>10.3f}")


if __name__ == "__main__":
    main()
