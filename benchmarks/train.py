"""Training throughput: Ray Train + DeepSpeed against plain single-process training, same model.

Measures, on a synthetic dataset written to a local directory:
  plain   the training loop of system/training.py in this process (torch AdamW, no Ray, no DeepSpeed)
  ray x1  pipelines.train with 1 worker owning all CPUs (ZeRO --zero-stage)
  ray x2  pipelines.train with 2 workers sharing the CPUs
Step times are medians over the steps after --warmup (start-up excluded); the overhead is the
1-worker Ray + DeepSpeed step time over the plain step time on the same per-worker batch and threads.

    .venv/bin/python -m benchmarks.train [--embed-dim 192] [--image-size 96] [--steps 30]
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
from system.data.stream import train_loader
from system.model import ClusterCAM
from system.optim import adamw, learning_rate, set_step_hyperparams
from system.training import TrainConfig, compute_loss, in_seg_phase, stream_config
from tests.datasets import build_synthetic


def config(data: str, output: str, args, **overrides) -> TrainConfig:
    items = {
        "model.num_classes": 4,
        "model.embed_dim": args.embed_dim,
        "model.img_size": args.image_size,
        "stream.image_size": args.image_size,
        "stream.batch_size": args.batch_size,
        "stream.augment": "light",
        "stream.num_workers": 0,
        "schedule.steps_per_epoch": args.steps,
        "schedule.seg_start_epoch": 0 if args.seg else 1,
        "max_steps": args.steps,
        "max_failures": 0,
        "zero_stage": args.zero_stage,
        "checkpoint.every_steps": 0,
        "metrics.log_every_steps": 1000,
        **overrides,
    }
    return load_config(TrainConfig, "configs/tiny.yaml", [f"data={data}", f"output={output}"] + [f"{k}={v}" for k, v in items.items()])


def plain_step_times(cfg: TrainConfig, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = ClusterCAM(cfg.model).train()
    optimizer = adamw(model, cfg.optim, lr=0.0)
    batches = iter(train_loader(cfg.data, 0, 1, stream_config(cfg, cfg.max_steps)))
    times = []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        lr = learning_rate(cfg.optim, cfg.global_batch, cfg.schedule.epochs, cfg.max_steps, step)
        set_step_hyperparams(optimizer, lr, in_seg_phase(cfg.schedule, 0))
        loss = compute_loss(model, model, images, labels, 0, cfg.schedule).total
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
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--seg", action="store_true", help="measure segmentation-phase steps (CAM + PAR + seg loss)")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = f"{tmp}/data"
        build_synthetic(data, num_images=max(64, args.batch_size * 4 * 2), num_classes=4, image_size=args.image_size,
                        shard_size=16)

        def median(times: list[float]) -> float:
            return statistics.median(times[args.warmup:])

        plain = median(plain_step_times(config(data, tmp, args), threads=cpus))
        one, wall1 = ray_step_times(config(data, tmp, args, num_workers=1, cpus_per_worker=cpus, run_name="x1"))
        two, wall2 = ray_step_times(config(data, tmp, args, num_workers=2, cpus_per_worker=cpus / 2, run_name="x2"))
        one, two = median(one), median(two)
        b = args.batch_size
        phase = "segmentation" if args.seg else "classification"
        print(f"ClusterCAM embed {args.embed_dim}, {args.image_size}px, batch {b}/worker, ZeRO {args.zero_stage}, "
              f"{phase} phase, {cpus} CPUs, median of steps {args.warmup + 1}..{args.steps}")
        print(f"{'run':<28}{'step s':>9}{'samples/s':>11}{'per core':>10}{'wall s':>9}")
        print(f"{'plain single process':<28}{plain:>9.3f}{b / plain:>11.2f}{b / plain / cpus:>10.2f}{'':>9}")
        print(f"{'ray + deepspeed, 1 worker':<28}{one:>9.3f}{b / one:>11.2f}{b / one / cpus:>10.2f}{wall1:>9.1f}")
        print(f"{'ray + deepspeed, 2 workers':<28}{two:>9.3f}{2 * b / two:>11.2f}{2 * b / two / cpus:>10.2f}{wall2:>9.1f}")
        print(f"Ray + DeepSpeed step overhead (1 worker vs plain): {100 * (one / plain - 1):+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
