"""Speed and memory of the ClusterCAM library against the naive spec transcription (benchmarks/naive.py).

DeiT-S / K=20 on this machine's CPU, batch 2, at each input size and precision:
  train  one seg-phase training step (forward + loss + backward + AdamW), seconds and peak memory
  cam    training-time multi-scale CAM (scales 1, 0.75, 1.25, flips) + PAR pseudo labels
  infer  one 500x375 image, five-scale test-time probabilities
Each figure is the median of --repeats runs after a warm-up, with the naive baseline timed in the same
process, interleaved with ours; peak memory of a training step is the resident-set growth of a fresh
subprocess (CPU allocations are not visible to torch's allocator statistics).

    .venv/bin/python -m benchmarks.model [--sizes 224 448] [--precisions fp32 bf16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.naive import (
    NaiveClusterCAM,
    NaivePAR,
    naive_denormalize,
    naive_multi_scale_cam,
    naive_predict_probs,
    naive_refine_cams_with_bkg,
    naive_train_loss,
)
from system.cam import multi_scale_cam, predict_probs
from system.losses import clustercam_loss
from system.model import build_clustercam
from system.optim import OptimConfig, adamw
from system.refine import denormalize, pseudo_labels

K = 20
BATCH = 2


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    fast = build_clustercam(num_classes=K)
    naive = NaiveClusterCAM(num_classes=K)
    naive.load_state_dict(fast.state_dict())
    return fast, naive


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Photo-like inputs (smooth regions and edges) so PAR's affinities are meaningful."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, max(2, height // 48), max(2, width // 48), generator=g)
    return F.interpolate(coarse, (height, width), mode="bicubic", align_corners=False).clamp(-2, 2)


def labels_for(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, K)
    for b in range(batch):
        labels[b, torch.randperm(K, generator=g)[: 1 + b % 3]] = 1
    return labels


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(impl: str, model, x, labels, pseudo, precision):
    """Ours steps with the trainer's optimizer (system.optim.adamw: fused), the baseline with torch's default."""
    if impl == "ours":
        opt = adamw(model, OptimConfig(), lr=1e-5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    model.train()

    def step():
        with autocast(precision):
            if impl == "ours":
                out = model(x)
                loss = clustercam_loss(out.cls_logits, out.pat_logits, labels, out.segs, pseudo).total
            else:
                loss = naive_train_loss(model, x, labels, pseudo)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cam_fn(impl: str, model, x, labels, precision, out: dict):
    def run():
        model.train()  # the authors make training CAMs in train mode
        with autocast(precision):
            if impl == "ours":
                cams = multi_scale_cam(model, x, (1.0, 0.75, 1.25))
                out[impl] = pseudo_labels(denormalize(x), cams, labels)
            else:
                cams = naive_multi_scale_cam(model, x, (1.0, 0.75, 1.25))
                out[impl] = naive_refine_cams_with_bkg(
                    NaivePAR(), naive_denormalize(x), cams * labels[..., None, None], labels, 0.5, 0.3
                )

    return run


def infer_fn(impl: str, model, image, precision, out: dict):
    def run():
        model.eval()
        with autocast(precision):
            probs = predict_probs(model, image) if impl == "ours" else naive_predict_probs(model, image)
        out[impl] = probs.argmax(dim=1)

    return run


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turn so drift hits all alike (after a warm-up)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _peak_train_memory_child(impl: str, size: int, precision: str, queue) -> None:
    model = make_models()[0 if impl == "ours" else 1]
    x = smooth_images(BATCH, size, size)
    labels = labels_for(BATCH)
    pseudo = torch.randint(0, K + 1, (BATCH, size, size))
    step = train_step_fn(impl, model, x, labels, pseudo, precision)
    step()  # optimizer state and gradients exist from here on, for both implementations alike
    before = _rss_bytes()
    step()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_train_memory(impl: str, size: int, precision: str) -> float:
    """Peak resident-set growth over a step in a fresh process.

    Large blocks are mmapped (and so returned to the system when freed) so that memory the first
    step released cannot hide the second step's peak.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    try:
        proc = ctx.Process(target=_peak_train_memory_child, args=(impl, size, precision, queue))
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["train", "cam", "infer"], choices=["train", "cam", "infer"])
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-memory runs")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DeiT-S K={K}, batch {BATCH}")
    print(f"{'task':<7}{'size':>6}{'prec':>6}{'ours s':>10}{'naive s':>10}{'ratio':>8}  notes")
    fp32_labels: dict = {}
    for size in args.sizes:
        fast, naive = make_models()
        x = smooth_images(BATCH, size, size)
        labels = labels_for(BATCH)
        pseudo = torch.randint(0, K + 1, (BATCH, size, size))
        for precision in args.precisions:
            if "train" in args.tasks:
                t = interleaved(
                    {
                        "ours": train_step_fn("ours", fast, x, labels, pseudo, precision),
                        "naive": train_step_fn("naive", naive, x, labels, pseudo, precision),
                    },
                    args.repeats,
                )
                note = ""
                if not args.no_memory:
                    ours_mem = peak_train_memory("ours", size, precision)
                    naive_mem = peak_train_memory("naive", size, precision)
                    note = f"peak step memory {ours_mem / 2**20:.0f} MiB vs {naive_mem / 2**20:.0f} MiB = {ours_mem / naive_mem:.2f}x"
                print(f"{'train':<7}{size:>6}{precision:>6}{t['ours']:>10.3f}{t['naive']:>10.3f}{t['ours'] / t['naive']:>8.2f}  {note}")
                fast, naive = make_models()  # the optimizer steps moved the weights apart
            if "cam" in args.tasks:
                out: dict = {}
                t = interleaved(
                    {
                        "ours": cam_fn("ours", fast, x, labels, precision, out),
                        "naive": cam_fn("naive", naive, x, labels, precision, out),
                    },
                    args.repeats,
                )
                torch.manual_seed(0)
                fast.eval()
                with autocast(precision):
                    eval_labels = pseudo_labels(denormalize(x), multi_scale_cam(fast, x), labels)
                agree = ""
                if precision == "fp32":
                    fp32_labels[size] = eval_labels
                elif size in fp32_labels:
                    agree = f"bf16 vs fp32 pseudo labels agree on {(eval_labels == fp32_labels[size]).float().mean().item():.2%} of pixels"
                print(f"{'cam':<7}{size:>6}{precision:>6}{t['ours']:>10.3f}{t['naive']:>10.3f}{t['ours'] / t['naive']:>8.2f}  {agree}")
        if "infer" in args.tasks and size == args.sizes[-1]:
            image = smooth_images(1, 375, 500, seed=1)
            for precision in args.precisions:
                out = {}
                t = interleaved(
                    {"ours": infer_fn("ours", fast, image, precision, out), "naive": infer_fn("naive", naive, image, precision, out)},
                    args.repeats,
                )
                same = (out["ours"] == out["naive"]).float().mean().item()
                print(f"{'infer':<7}{'500x375':>6}{precision:>6}{t['ours']:>10.3f}{t['naive']:>10.3f}{t['ours'] / t['naive']:>8.2f}  masks agree {same:.2%}")


if __name__ == "__main__":
    main()
