"""Train the DeiT-S ClusterCAM briefly on synthetic scenes, for benchmarks that compare precisions.

A randomly initialised ClusterCAM has near-uniform attention, so its CAMs are almost flat and the
min-max normalisation of docs/method.md §b.4 blows rounding noise up to whole-map differences: bf16 and fp32
pseudo labels of a random model disagree on many pixels in our implementation and in the naive
baseline alike. A model whose CAMs follow the objects is the fair subject. Real checkpoints cannot be
downloaded here, so this trains the classification phase (docs/method.md §b.3 before ``seg_start_epoch``) on
the synthetic source's scenes, which is far quicker on a GPU than on a CPU.

    python -m benchmarks.pretrain --out deit_s.pt [--steps 800] [--device cuda]
    python -m benchmarks.model --weights deit_s.pt --device cuda --tasks cam infer
"""

from __future__ import annotations

import argparse
import io
import math
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from system.data.sources.synthetic import render
from system.hardware import autocast, resolve_precision
from system.label.infer import to_input
from system.losses import clustercam_loss
from system.model import build_clustercam
from system.optim import OptimConfig, adamw

K = 20


def _scene(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    index, size, seed = args
    jpg, _, classes = render(index, K, size, seed=seed)
    labels = np.zeros(K, dtype=np.float32)
    labels[classes] = 1
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")), labels


def scenes(n: int, size: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,size,size,3) uint8 images and (n,K) multi-hot labels, rendered in parallel."""
    with ProcessPoolExecutor() as pool:
        items = list(pool.map(_scene, [(i, size, seed) for i in range(n)], chunksize=64))
    return torch.from_numpy(np.stack([im for im, _ in items])), torch.from_numpy(np.stack([lab for _, lab in items]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to save the state dict (torch.save, authors' key names)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)

    start = time.perf_counter()
    images, labels = scenes(args.images, args.size + args.size // 8)
    images, labels = images.to(device), labels.to(device)
    print(f"rendered {len(images)} scenes in {time.perf_counter() - start:.0f} s; training in {precision} on {device}")

    torch.manual_seed(0)
    model = build_clustercam(num_classes=K, drop_path_rate=0.1).to(device).train()
    optimizer = adamw(model, OptimConfig(), lr=args.lr)
    warmup = max(1, args.steps // 20)
    g = torch.Generator(device="cpu").manual_seed(0)
    crop = images.shape[1] - args.size
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (args.batch,), generator=g).to(device)
        top, left = torch.randint(crop + 1, (2,), generator=g).tolist()
        x = to_input(images[idx, top : top + args.size, left : left + args.size])
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(-1)
        with autocast(precision, device):
            out = model(x, with_seg=False)
            loss = clustercam_loss(out.cls_logits, out.pat_logits, labels[idx]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.perf_counter() - start:.0f} s")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
