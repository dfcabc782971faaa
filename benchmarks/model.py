"""Speed and memory of the ClusterCAM library against the naive spec transcription (benchmarks/naive.py).

DeiT-S / K=20, batch 2, on this machine's CPU (or --device cuda), at each input size and precision:
  train  one seg-phase training step (forward + loss + backward + AdamW), seconds and peak memory
  cam    training-time multi-scale CAM (scales 1, 0.75, 1.25, flips) + PAR pseudo labels
  infer  one 500x375 image, five-scale test-time probabilities
Each figure is the median of --repeats runs after a warm-up, with the naive baseline timed in the same
process, interleaved with ours. Peak memory of a training step is the most tensor memory allocated at
once during a step, above what was live before it (parameters and optimizer state): torch's allocator
statistics on CUDA, the profiler's allocation events on CPU. The resident set is no measure of it:
glibc and oneDNN keep freed blocks and scratch buffers whose size depends on thread count and history.

    .venv/bin/python -m benchmarks.model [--sizes 224 448] [--precisions fp32 bf16] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.naive import (
    NaiveClusterCAM,
    NaivePAR,
    naive_denormalize,
    naive_multi_scale_cam,
    naive_predict_probs,
    naive_refine_cams_with_bkg,
    naive_train_loss,
)
from benchmarks.pretrain import scenes
from system.cam import multi_scale_cam, predict_probs
from system.hardware import autocast, resolve_precision
from system.label.infer import to_input
from system.losses import clustercam_loss
from system.model import build_clustercam, read_state_dict
from system.optim import OptimConfig, adamw
from system.refine import denormalize, pseudo_labels

K = 20
BATCH = 2


def make_models(device: torch.device, weights: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    fast = build_clustercam(num_classes=K)
    if weights:
        fast.load_state_dict(read_state_dict(weights))
    naive = NaiveClusterCAM(num_classes=K)
    naive.load_state_dict(fast.state_dict())
    return fast.to(device), naive.to(device)


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


def inputs(n: int, size: int, trained: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels: scenes with objects for a trained model (its CAMs follow them), else smooth noise."""
    if trained:
        images, labels = scenes(n, size, seed=99)
        return to_input(images).to(device), labels.to(device)
    return smooth_images(n, size, size).to(device), labels_for(n).to(device)


def agreement_labels(model, data: tuple[torch.Tensor, torch.Tensor], precision: str) -> torch.Tensor:
    """Eval-mode pseudo labels of every image, BATCH at a time, for the bf16-vs-fp32 comparison."""
    model.eval()
    out = []
    with torch.no_grad(), autocast(resolve_precision(precision, data[0].device), data[0].device):
        for x, labels in zip(data[0].split(BATCH), data[1].split(BATCH)):
            out.append(pseudo_labels(denormalize(x), multi_scale_cam(model, x), labels))
    return torch.cat(out)


def train_step_fn(impl: str, model, x, labels, pseudo, precision):
    """Ours steps with the trainer's optimizer (system.optim.adamw: fused), the baseline with torch's default."""
    if impl == "ours":
        opt = adamw(model, OptimConfig(), lr=1e-5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    model.train()

    def step():
        with autocast(resolve_precision(precision, x.device), x.device):
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
        with autocast(resolve_precision(precision, x.device), x.device):
            if impl == "ours":
                cams = multi_scale_cam(model, x, (1.0, 0.75, 1.25))
                out[impl] = pseudo_labels(denormalize(x), cams, labels)
            else:
                cams = naive_multi_scale_cam(model, x, (1.0, 0.75, 1.25))
                out[impl] = naive_refine_cams_with_bkg(
                    NaivePAR().to(x.device), naive_denormalize(x), cams * labels[..., None, None], labels, 0.5, 0.3
                )

    return run


def infer_fn(impl: str, model, image, precision, out: dict):
    def run():
        model.eval()
        with autocast(resolve_precision(precision, image.device), image.device):
            probs = predict_probs(model, image) if impl == "ours" else naive_predict_probs(model, image)
        out[impl] = probs.argmax(dim=1)

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each function, run in turn so drift hits all alike (after a warm-up)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_step_memory(step, device: torch.device) -> int:
    """Bytes allocated at the step's peak beyond those live when it started (call after a first step)."""
    synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        # the profiler replaces the file at this path, so read the path, not the handle
        events = [
            e["args"] for e in json.loads(Path(trace.name).read_text())["traceEvents"] if e.get("name") == "[memory]"
        ]
    # "Total Allocated" counts from the profiler's start; frees of older blocks are not in it (unknown size)
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["train", "cam", "infer"], choices=["train", "cam", "infer"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--agree-images", type=int, default=8, help="images for the bf16-vs-fp32 pseudo-label agreement"
    )
    parser.add_argument(
        "--weights",
        help="DeiT-S K=20 state dict (benchmarks/pretrain.py) instead of random weights, "
        "for bf16-vs-fp32 pseudo-label agreement on a model whose CAMs follow objects",
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, DeiT-S K={K}, batch {BATCH}, weights {args.weights or 'random'}")
    print(f"{'task':<7}{'size':>6}{'prec':>6}{'ours s':>10}{'naive s':>10}{'ratio':>8}  notes")
    fp32_labels: dict = {}
    for size in args.sizes:
        fast, naive = make_models(device, args.weights)
        x, labels = inputs(BATCH, size, bool(args.weights), device)
        agree_inputs = inputs(args.agree_images, size, bool(args.weights), device)
        pseudo = torch.randint(0, K + 1, (BATCH, size, size)).to(device)
        for precision in args.precisions:
            if "train" in args.tasks:
                steps = {
                    "ours": train_step_fn("ours", fast, x, labels, pseudo, precision),
                    "naive": train_step_fn("naive", naive, x, labels, pseudo, precision),
                }
                t = interleaved(steps, args.repeats, device)
                ours_mem = peak_step_memory(steps["ours"], device)
                naive_mem = peak_step_memory(steps["naive"], device)
                ratio = ours_mem / naive_mem
                note = f"peak step memory {ours_mem / 2**20:.0f} MiB vs {naive_mem / 2**20:.0f} MiB = {ratio:.2f}x"
                print(
                    f"{'train':<7}{size:>6}{precision:>6}{t['ours']:>10.3f}{t['naive']:>10.3f}"
                    f"{t['ours'] / t['naive']:>8.2f}  {note}"
                )
                fast, naive = make_models(device, args.weights)  # the optimizer steps moved the weights apart
            if "cam" in args.tasks:
                out: dict = {}
                t = interleaved(
                    {
                        "ours": cam_fn("ours", fast, x, labels, precision, out),
                        "naive": cam_fn("naive", naive, x, labels, precision, out),
                    },
                    args.repeats,
                    device,
                )
                eval_labels = agreement_labels(fast, agree_inputs, precision)
                agree = ""
                if precision == "fp32":
                    fp32_labels[size] = eval_labels
                elif size in fp32_labels:
                    agreement = (eval_labels == fp32_labels[size]).float().mean().item()
                    agree = (
                        f"bf16 vs fp32 pseudo labels of {args.agree_images} images agree on {agreement:.2%} of pixels"
                    )
                print(
                    f"{'cam':<7}{size:>6}{precision:>6}{t['ours']:>10.3f}{t['naive']:>10.3f}"
                    f"{t['ours'] / t['naive']:>8.2f}  {agree}"
                )
        if "infer" in args.tasks and size == args.sizes[-1]:
            image = smooth_images(1, 375, 500, seed=1).to(device)
            for precision in args.precisions:
                out = {}
                t = interleaved(
                    {
                        "ours": infer_fn("ours", fast, image, precision, out),
                        "naive": infer_fn("naive", naive, image, precision, out),
                    },
                    args.repeats,
                    device,
                )
                same = (out["ours"] == out["naive"]).float().mean().item()
                print(
                    f"{'infer':<7}{'500x375':>6}{precision:>6}{t['ours']:>10.3f}{t['naive']:>10.3f}"
                    f"{t['ours'] / t['naive']:>8.2f}  masks agree {same:.2%}"
                )


if __name__ == "__main__":
    main()
