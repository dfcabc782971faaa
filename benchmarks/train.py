"""Training throughput: Ray Train + DeepSpeed against plain single-process training, same model.

Measures, on a synthetic dataset written to a local directory:
  plain   the training loop of system/training.py in this process (torch AdamW, no Ray, no DeepSpeed),
          once before and once after the Ray runs: the baseline is their mean, and their spread is
          printed because a shared machine drifts by more than the overhead being measured
  ray x1  pipelines.train with 1 worker owning all CPUs, once per ZeRO stage in --zero-stages
  ray x2  pipelines.train with 2 workers sharing the CPUs (first stage in --zero-stages)
Step times are medians over the steps after --warmup (start-up excluded); the overhead is the
1-worker Ray + DeepSpeed step time over the plain step time on the same per-worker batch and threads.
Ray runs with its default settings (health checks included), as a user's job would.

    .venv/bin/python -m benchmarks.train [--embed-dim 384 --image-size 224 --batch-size 2] [--zero-stages 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from system.config import load_config
from system.data.shards import read_dataset
from system.data.stream import train_loader
from system.model import ClusterCAM
from system.optim import adamw, learning_rate, set_step_hyperparams
from system.training import TrainConfig, in_seg_phase, micro_batch_losses, stream_config
from tests.datasets import build_synthetic


def config(data: str, output: str, args, **overrides) -> TrainConfig:
    items = {
        "model.num_classes": 4,
        "model.embed_dim": args.embed_dim,
        "model.depth": 12,  # the 12-block, 16 px model the README's overhead figures were measured on
        "model.patch_size": 16,
        "model.img_size": args.image_size,
        "stream.image_size": args.image_size,
        "stream.batch_size": args.batch_size,
        "stream.augment": "light",
        "stream.num_workers": 0,
        "schedule.steps_per_epoch": args.steps,
        "schedule.seg_start_epoch": 0 if args.seg else 1,
        "max_steps": args.steps,
        "max_failures": 0,
        "checkpoint.every_steps": 0,
        "metrics.log_every_steps": 1000,
        "deepspeed.precision": "fp32",  # the plain baseline runs fp32; auto would pick bf16 on AMX CPUs
        **overrides,
    }
    return load_config(
        TrainConfig, "configs/tiny.yaml", [f"data={data}", f"output={output}"] + [f"{k}={v}" for k, v in items.items()]
    )


def plain_step_times(cfg: TrainConfig, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = ClusterCAM(cfg.model).train()
    optimizer = adamw(model, cfg.optim, lr=0.0)
    partial = read_dataset(cfg.data).partial_labels
    batches = iter(train_loader(cfg.data, 0, 1, stream_config(cfg, cfg.max_steps)))
    times = []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        images, labels, known = next(batches)
        lr = learning_rate(cfg.optim, cfg.global_batch, cfg.schedule.epochs, cfg.max_steps, step)
        set_step_hyperparams(optimizer, lr, in_seg_phase(cfg.schedule, 0))
        loss = micro_batch_losses(model, model, images, labels, 0, cfg.schedule, known=known if partial else None).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times


def ray_step_times(cfg: TrainConfig) -> tuple[list[float], float]:
    from pipelines.train import run

    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in Path(cfg.run_uri(), "history.jsonl").read_text().splitlines()]
    samples = cfg.stream.batch_size * cfg.schedule.grad_accum * cfg.num_workers
    return [samples / r["samples_per_s"] for r in rows], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--zero-stages",
        default=[0],
        type=lambda text: [int(x) for x in text.split(",")],
        help="comma-separated ZeRO stages for the 1-worker runs",
    )
    parser.add_argument("--seg", action="store_true", help="measure segmentation-phase steps (CAM + PAR + seg loss)")
    args = parser.parse_args()
    stages = args.zero_stages
    cpus = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = f"{tmp}/data"
        build_synthetic(
            data, num_images=max(64, args.batch_size * 4 * 2), num_classes=4, image_size=args.image_size, shard_size=16
        )

        def median(times: list[float]) -> float:
            return statistics.median(times[args.warmup :])

        plain_before = median(plain_step_times(config(data, tmp, args), threads=cpus))
        ones = {}
        for stage in stages:
            times, wall = ray_step_times(
                config(
                    data, tmp, args, num_workers=1, cpus_per_worker=cpus, zero_stage=stage, run_name=f"x1-zero{stage}"
                )
            )
            ones[stage] = median(times), wall
        two, wall2 = ray_step_times(
            config(data, tmp, args, num_workers=2, cpus_per_worker=cpus / 2, zero_stage=stages[0], run_name="x2")
        )
        two = median(two)
        plain_after = median(plain_step_times(config(data, tmp, args), threads=cpus))
        plain = (plain_before + plain_after) / 2
        b = args.batch_size
        phase = "segmentation" if args.seg else "classification"
        print(
            f"ClusterCAM embed {args.embed_dim}, {args.image_size}px, batch {b}/worker, {phase} phase, {cpus} CPUs, "
            f"median of steps {args.warmup + 1}..{args.steps}"
        )
        print(f"{'run':<32}{'step s':>9}{'samples/s':>11}{'per core':>10}{'wall s':>9}{'overhead':>10}")

        def row(name: str, step: float, samples: int, wall: float | None = None, overhead: bool = False) -> None:
            extra = f"{wall:>9.1f}" if wall is not None else f"{'':>9}"
            extra += f"{100 * (step / plain - 1):>+9.1f}%" if overhead else ""
            print(f"{name:<32}{step:>9.3f}{samples / step:>11.2f}{samples / step / cpus:>10.2f}{extra}")

        row("plain single process (mean)", plain, b)
        print(f"  before / after the Ray runs: {plain_before:.3f} / {plain_after:.3f} s")
        for stage, (one, wall) in ones.items():
            row(f"ray + deepspeed ZeRO {stage}, 1 worker", one, b, wall, overhead=True)
        row(f"ray + deepspeed ZeRO {stages[0]}, 2 workers", two, 2 * b, wall2)
        print("target: Ray + DeepSpeed step overhead (1 worker vs plain) <= 10%")


if __name__ == "__main__":
    main()
