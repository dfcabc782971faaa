"""Labelling throughput: our batched Labeller against the reference-style loop, in the same run.

    .venv/bin/python -m benchmarks.label [--images 6] [--bf16-images 2] [--batch-size 3] [--rounds 2] \\
        [--threads 2] [--device cpu]

Model: the DeiT-S ClusterCAM (K=20, C=384, 12 blocks x 6 heads, LargeFOV decoder 512), random
weights with the decoder's last layer scaled up so the probabilities are peaked as a trained
model's are (a fresh decoder is near-uniform and its argmax is decided by rounding noise). Images:
500x375 JPEGs (synthetic shapes). Both sides decode the JPEG, normalise, run the five test scales
(0.5-1.5, docs/method.md §c.1), take the argmax and encode the PNG, so the figures are images in -> masks out.

- reference: the reference-style loop (one image at a time, decode -> five scales -> argmax -> PNG)
  with the same model (``system.cam.predict_probs``), fp32; the labeller's fp32 masks must be identical;
- authors' attention: the same loop on ``NaiveClusterCAM`` (``benchmarks.naive``: every attention map
  materialised, as the authors compute), for the speed of their formulation; fused and explicit
  softmax round differently, so a few pixels at near-ties may differ, and the count is printed;
- ours fp32: ``system.label.infer.Labeller`` (fused attention, batches of same-size images,
  decode threads), tag restriction off so masks are comparable;
- ours bf16: the same with bf16 autocast; pixel agreement with our fp32 masks is reported.

FLOPs of one image (five scales) are counted with ``torch.utils.flop_counter``: on the CPU they turn
the measured throughput into an estimate for an H100; on a GPU (``--device cuda``) into the achieved
TFLOP/s.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils import flop_counter

from benchmarks.model import synchronize
from benchmarks.naive import NaiveClusterCAM, naive_predict_probs
from system import hardware
from system.cam import INFER_SCALES, predict_probs
from system.data.sources.synthetic import render
from system.label.config import LabelConfig
from system.label.infer import Labeller, to_input
from system.label.inputs import Sample
from system.masks import encode_mask, mask_codec
from system.model import build_clustercam

H, W = 375, 500
K = 20
H100_BF16_DENSE_TFLOPS = 989.0


def make_images(n: int) -> list[Sample]:
    samples = []
    for i in range(n):
        jpg, _, classes = render(i, K, W, seed=11)
        pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))[:H]
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        samples.append(Sample(f"img{i}", f"img{i}", tuple(classes), out.getvalue(), None, "bench"))
    return samples


def make_models(device: torch.device):
    torch.manual_seed(0)
    model = build_clustercam(num_classes=K, drop_path_rate=0.0).eval()
    with torch.no_grad():
        model.decoder.conv8.weight.mul_(20)
    naive = NaiveClusterCAM(num_classes=K, drop_path_rate=0.0).eval()
    naive.load_state_dict(model.state_dict(), strict=True)
    return model.to(device), naive.to(device)


def reference(model, samples, predict=predict_probs) -> tuple[list[np.ndarray], float]:
    device = next(model.parameters()).device
    start = time.perf_counter()
    masks = []
    for s in samples:
        pixels = np.array(Image.open(io.BytesIO(s.image)).convert("RGB"))
        probs = predict(model, to_input(pixels)[None].to(device), INFER_SCALES)
        mask = probs[0].argmax(0).to(torch.uint8).cpu().numpy()
        encode_mask(mask)
        masks.append(mask)
    return masks, time.perf_counter() - start


def ours(model, samples, precision: str, batch_size: int) -> tuple[list[np.ndarray], float]:
    cfg = LabelConfig(
        model="bench",
        data="bench",
        output="bench",
        precision=precision,
        batch_size=batch_size,
        restrict_to_tags=False,
        scales=list(INFER_SCALES),
    )
    labeller = Labeller(model, cfg, [f"c{k}" for k in range(K)])
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        results = {}
        for r in labeller.label(samples, pool):
            mask_codec("png").encode(r.masks["seg"], {"key": r.sample.key})
            results[r.sample.key] = r.masks["seg"]
    return [results[s.key] for s in samples], time.perf_counter() - start


def model_only(model, batch_size: int, precision: str, repeats: int = 5) -> float:
    """Images/s of the five-scale forward alone: how far the decode/encode pipeline is from the device's pace."""
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, H, W, device=device)
    with torch.no_grad(), hardware.autocast(hardware.resolve_precision(precision, device), device):
        predict_probs(model, x, INFER_SCALES)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            predict_probs(model, x, INFER_SCALES).argmax(1)
        synchronize(device)
    return batch_size * repeats / (time.perf_counter() - start)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def flops_per_image(model) -> float:
    """Matmul/conv/attention FLOPs of the five-scale forward (the counter lacks CPU flash attention)."""
    x = torch.zeros(1, 3, H, W, device=next(model.parameters()).device)
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=extra) as counter, torch.no_grad():
        predict_probs(model, x, INFER_SCALES)
    return float(counter.get_total_flops())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument(
        "--bf16-images", type=int, default=2, help="bf16 is emulated (slow) on CPUs without AVX512-BF16"
    )
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=2, help="reference + ours fp32 pairs; the speed-up is their median"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, naive = make_models(device)
    samples = make_images(args.images)
    warm = args.batch_size if device.type == "cuda" else 1  # a GPU picks kernels per batch shape
    for precision in ("fp32", "bf16") if args.bf16_images else ("fp32",):  # warm-up: allocator, kernel choice
        ours(model, samples[:warm], precision, args.batch_size)
    reference(model, samples[:1])
    reference(naive, samples[:1], naive_predict_probs)

    pairs = []
    for _ in range(args.rounds):  # reference and ours side by side: this machine's speed drifts between runs
        ref_masks, ref_s = reference(model, samples)
        fp32_masks, fp32_s = ours(model, samples, "fp32", args.batch_size)
        pairs.append((ref_s, fp32_s))
    ref_s = statistics.median(r for r, _ in pairs)
    fp32_s = ref_s / statistics.median(r / o for r, o in pairs)
    naive_masks, naive_s = reference(naive, samples, naive_predict_probs)
    identical = all(np.array_equal(a, b) for a, b in zip(ref_masks, fp32_masks))
    differing = sum(int((a != b).sum()) for a, b in zip(ref_masks, fp32_masks))
    naive_differing = sum(int((a != b).sum()) for a, b in zip(naive_masks, fp32_masks))
    pixels = sum(m.size for m in fp32_masks)
    rows = {
        "reference loop fp32 (1 image at a time)": (args.images / ref_s, None),
        "same loop, authors' explicit attention": (args.images / naive_s, f"{naive_differing} of {pixels} px differ"),
        f"ours fp32 (batch {args.batch_size})": (args.images / fp32_s, identical),
    }
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "images": args.images,
        "size": [W, H],
        "scales": list(INFER_SCALES),
        "reference_images_per_s": args.images / ref_s,
        "fp32_images_per_s": args.images / fp32_s,
        "fp32_speedup": ref_s / fp32_s,
        "fp32_identical_masks": identical,
        "fp32_differing_pixels": differing,
        "authors_attention_images_per_s": args.images / naive_s,
        "fp32_speedup_vs_authors_attention": naive_s / fp32_s,
        "authors_attention_differing_pixels": naive_differing,
    }
    if args.bf16_images:
        n = min(args.bf16_images, args.images)
        bf16_masks, bf16_s = ours(model, samples[:n], "bf16", args.batch_size)
        agree = float(np.mean([np.mean(a == b) for a, b in zip(bf16_masks, fp32_masks[:n])]))
        rows[f"ours bf16 (batch {args.batch_size}, {n} images)"] = (n / bf16_s, agree)
        result.update(
            {
                "bf16_images_per_s": n / bf16_s,
                "bf16_speedup_vs_reference": (n / bf16_s) / (args.images / ref_s),
                "bf16_pixel_agreement_with_fp32": agree,
                "bf16_native": hardware.native_bf16(device),
            }
        )
    if device.type == "cuda":
        for precision in ("fp32", "bf16"):
            rate = model_only(model, args.batch_size, precision)
            rows[f"model alone {precision} (batch {args.batch_size}, no I/O)"] = (rate, None)
            result[f"model_only_{precision}_images_per_s"] = rate
    flops = flops_per_image(model)
    result["gflops_per_image"] = flops / 1e9
    result["achieved_gflops_fp32"] = flops * result["fp32_images_per_s"] / 1e9
    if "bf16_images_per_s" in result:
        result["achieved_gflops_bf16"] = flops * result["bf16_images_per_s"] / 1e9
    for mfu in (0.25, 0.4):
        result[f"h100_images_per_s_at_{int(mfu * 100)}pct_mfu"] = H100_BF16_DENSE_TFLOPS * 1e12 * mfu / flops
    print(f"{'path':45s} {'images/s':>9s} {'x ref':>6s}  masks")
    for name, (rate, check) in rows.items():
        if check is None or isinstance(check, str):
            note = check or ""
        elif isinstance(check, bool):
            note = "identical to the reference" if check else f"{differing} px differ from the reference"
        else:
            note = f"{100 * check:.2f}% px = fp32"
        print(f"{name:45s} {rate:9.3f} {rate / result['reference_images_per_s']:6.2f}  {note}")
    print(
        f"FLOPs per 500x375 image, 5 scales: {flops / 1e9:.1f} GFLOP; {result['device']} reaches "
        f"{result['achieved_gflops_fp32']:.0f} GFLOP/s in fp32"
    )
    if "achieved_gflops_bf16" in result:
        print(f"and {result['achieved_gflops_bf16']:.0f} GFLOP/s in bf16")
    print(
        f"H100 estimate (989 dense bf16 TFLOP/s): {result['h100_images_per_s_at_25pct_mfu']:.0f}-"
        f"{result['h100_images_per_s_at_40pct_mfu']:.0f} images/s at 25-40% MFU"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
