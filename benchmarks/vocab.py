"""Cost of the two heads as the vocabulary grows: parameters, forward FLOPs and peak memory per K.

    python -m benchmarks.vocab [--classes 20 80 600 2000] [--size 224] [--device cpu|cuda] [--max-param-gib 2]

Model: the DeiT-S ClusterCAM every config trains (``ClusterCAMConfig`` defaults: C=384, 12 blocks x 6
heads, LargeFOV decoder 512; the configs set only ``num_classes``), once with ``model.head=authors`` and
once with ``model.head=scalable`` (system/model/scalable.py, docs/method.md §a.8), for each K.
One image, inference forward with the decoder (``model(x)``: class tokens, head and segmentation).

- params: parameter count;
- GFLOP: ``torch.utils.flop_counter.FlopCounterMode`` over that forward (a multiply-add counts 2),
  counted on the meta device, so no weights are allocated and every K is counted;
- peak MiB: tensor memory of the forward beyond the parameters (``benchmarks.model.peak_step_memory``:
  torch's allocator statistics on CUDA, the profiler's allocation events on CPU); measured only for
  models whose parameters fit in ``--max-param-gib`` (the authors' head at K=2000 holds 13 GiB).

Image size: 224 px on the CPU, 448 px on CUDA (the configs' training crop), unless ``--size`` is set.
Target: the scalable head at K=600 costs at most 1.5x the authors' head at K=80 in forward FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.model import peak_step_memory
from system.model import ClusterCAMConfig, build_model, num_parameters

HEADS = ("authors", "scalable")
TARGET_RATIO = 1.5


@dataclasses.dataclass(frozen=True)
class Cost:
    head: str
    classes: int
    params: int
    gflop: float
    peak_mib: float | None  # None when the model was too large to build here


def forward_gflop(cfg: ClusterCAMConfig, size: int) -> tuple[int, float]:
    """Parameters and forward GFLOP of one ``size`` x ``size`` image, counted without allocating weights."""
    with torch.device("meta"):
        model = build_model(cfg).eval()
        x = torch.empty(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return num_parameters(model), counter.get_total_flops() / 1e9


def forward_peak_mib(cfg: ClusterCAMConfig, size: int, device: torch.device) -> float:
    model = build_model(cfg).to(device).eval()
    x = torch.randn(1, 3, size, size, device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    forward()  # first call: one-off allocations (oneDNN scratch, CUDA context) are not the forward's
    return peak_step_memory(forward, device) / 2**20


def measure(head: str, classes: int, size: int, device: torch.device, max_param_bytes: float) -> Cost:
    cfg = ClusterCAMConfig(head=head, num_classes=classes)
    params, gflop = forward_gflop(cfg, size)
    peak = forward_peak_mib(cfg, size, device) if 4 * params <= max_param_bytes else None
    return Cost(head, classes, params, gflop, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 80, 600, 2000])
    parser.add_argument("--size", type=int, default=None, help="image side; default 224 on cpu, 448 on cuda")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-param-gib", type=float, default=None, help="default 2 on cpu, no limit on cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or (448 if device.type == "cuda" else 224)
    limit = args.max_param_gib if args.max_param_gib is not None else (2.0 if device.type == "cpu" else float("inf"))

    print(f"DeiT-S ClusterCAM, one {size}x{size} image, forward with decoder, {device.type}")
    print(f"{'head':<10}{'K':>6}{'params (M)':>12}{'GFLOP':>10}{'peak MiB':>10}")
    costs = {}
    for classes in args.classes:
        for head in HEADS:
            cost = measure(head, classes, size, device, limit * 2**30)
            costs[head, classes] = cost
            peak = f"{cost.peak_mib:>10.0f}" if cost.peak_mib is not None else f"{'(skip)':>10}"
            print(f"{head:<10}{classes:>6}{cost.params / 1e6:>12.1f}{cost.gflop:>10.1f}{peak}", flush=True)
    if ("scalable", 600) in costs and ("authors", 80) in costs:
        ratio = costs["scalable", 600].gflop / costs["authors", 80].gflop
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        print(f"scalable K=600 / authors K=80 forward FLOPs: {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict})")


if __name__ == "__main__":
    main()
