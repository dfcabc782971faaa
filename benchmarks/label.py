"""Labelling throughput: our batched Labeller against the reference-style loop, in the same run.

    .venv/bin/python -m benchmarks.label [--images 6] [--bf16-images 2] [--batch-size 3] [--rounds 2] \\
        [--threads 2] [--device cpu] [--host-images 300] [--host-workers 2] [--host-only]

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

Host ceiling (``--host-images``): the whole host path of a labelling actor (read the JPEG from a
local folder, decode, resize, the model replaced by a zero-cost stand-in that returns a fixed mask
of the image's size, PNG encode with the stats line, write the mask to a local folder) through the
real ``Labeller.label`` and ``OutputWriter``, once with the in-process threads (``host_workers=0``)
and once with worker processes (``host_workers=N``), in the same run. The figure is images per
CPU-second (``benchmarks.cputime``: this process and its workers), i.e. images/s per core, which a
loaded machine skews far less than a wall-clock rate; both are printed. Where CUDA is available the
same path with the real model (bf16, five scales) gives the end-to-end images/s per GPU beside the
model-alone rate and the MFU against the GPU's dense bf16 peak.

FLOPs of one image (five scales) are counted with ``torch.utils.flop_counter``: on the CPU they turn
the measured throughput into an estimate for an H100; on a GPU (``--device cuda``) into the achieved
TFLOP/s.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils import flop_counter

from benchmarks.cputime import CpuClock
from benchmarks.model import synchronize
from benchmarks.naive import NaiveClusterCAM, naive_predict_probs
from system import hardware, storage
from system.cam import INFER_SCALES, predict_probs
from system.data.sources.synthetic import render
from system.label.config import LabelConfig
from system.label.hostpool import host_pool
from system.label.infer import Decoded, Labelled, Labeller, to_input
from system.label.inputs import Sample
from system.label.outputs import OutputWriter
from system.masks import encode_mask, mask_codec
from system.model import build_clustercam

H, W = 375, 500
K = 20
H100_BF16_DENSE_TFLOPS = 989.0
# dense bf16 peak TFLOP/s by device name, for the MFU of a GPU run (a name not here gets no MFU)
GPU_BF16_DENSE_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


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


@functools.lru_cache(maxsize=16)
def fixed_mask(height: int, width: int) -> np.ndarray:
    """A plausible mask (background, two objects, an ignore band), so the PNG encode costs what a real one does."""
    mask = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    mask[((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 3) / (width / 4)) ** 2 < 1] = 1
    mask[height // 5 : height // 2, 2 * width // 3 : 9 * width // 10] = 3
    mask[height // 5 - 2 : height // 5 + 2, 2 * width // 3 : 9 * width // 10] = 255
    mask.setflags(write=False)
    return mask


class ZeroCostLabeller(Labeller):
    """The labeller with the forward replaced by a fixed mask of each image's size: what is left is the host path."""

    def _run(self, batch: list[Decoded]) -> list[Labelled]:
        out = []
        for d in batch:
            H, W = d.pixels.shape[:2]
            masks = {mode: fixed_mask(H, W) for mode in self.cfg.modes}
            conf = {mode: 0.9 for mode in self.cfg.modes}
            per_class = {mode: {0: 0.95, 1: 0.8, 3: 0.7} for mode in self.cfg.modes}
            out.append(Labelled(d.sample, d.pixels, d.gt, masks, conf, d.size, per_class))
        return out


def write_jpegs(samples: list[Sample], n: int, folder: str) -> list[tuple[str, Sample]]:
    """``n`` JPEG files (the benchmark images, repeated) in a local folder, as a job reads them."""
    files = []
    for i in range(n):
        s = samples[i % len(samples)]
        uri = storage.join(folder, f"img{i}.jpg")
        storage.put_bytes(uri, s.image)
        files.append((uri, Sample(f"img{i}", f"img{i}", s.labels, None, None, "bench")))
    return files


def label_path(labeller: Labeller, files: list[tuple[str, Sample]], output: str, pool) -> list[dict]:
    """One actor's labelling of ``files``: read, the labeller's decode/batch/run, the writer's encode/upload."""

    def samples():
        for uri, s in files:
            yield Sample(s.key, s.id, s.labels, storage.get_bytes(uri), None, s.source)

    labeller.cfg.output = output
    writer = OutputWriter(labeller.cfg, labeller.class_names, "bench", "w0", "bench", pool)
    writer.begin_unit()
    for item in labeller.label(samples(), pool):
        writer.submit(item)
        writer.collect()
    if writer.close():
        raise RuntimeError("a mask write failed in the benchmark")
    return writer.unit_lines


def host_config(output: str, workers: int, threads: int, batch_size: int, precision: str = "fp32") -> LabelConfig:
    return LabelConfig(
        model="bench",
        data="bench",
        output=output,
        precision=precision,
        batch_size=batch_size,
        restrict_to_tags=False,
        scales=list(INFER_SCALES),
        host_workers=workers,
        decode_threads=threads,
        flush_every=10**6,
    )


def timed_path(labeller: Labeller, files, root: str, name: str) -> dict:
    """Images/s (wall) and images per CPU-second of the host path, after a warm-up (workers started, imports)."""
    pool = host_pool(labeller.cfg)
    try:
        label_path(labeller, files[: 4 * labeller.cfg.batch_size], storage.join(root, name + "-warm"), pool)
        clock = CpuClock()
        cpu, wall = clock.now(), time.perf_counter()
        lines = label_path(labeller, files, storage.join(root, name), pool)
        cpu, wall = clock.now() - cpu, time.perf_counter() - wall
    finally:
        pool.shutdown()
    return {
        "images": len(lines),
        "images_per_s": len(lines) / wall,
        "images_per_cpu_s": len(lines) / cpu,
        "cores_busy": cpu / wall,
    }


def host_ceiling(samples: list[Sample], n: int, workers: int, threads: int, batch_size: int) -> dict:
    """The host path with a zero-cost model: in-process threads, then worker processes, in the same run."""
    model = build_clustercam(
        num_classes=K, embed_dim=48, depth=1, num_heads=6, img_size=64, drop_path_rate=0.0, decoder_channels=16
    ).eval()
    names = [f"c{k}" for k in range(K)]
    with tempfile.TemporaryDirectory(prefix="label-host-") as root:
        files = write_jpegs(samples, n, storage.join(root, "images"))
        out = {}
        for name, w in (("threads", 0), ("processes", workers)):
            labeller = ZeroCostLabeller(model, host_config(root, w, threads, batch_size), names)
            out[name] = {"host_workers": w, "decode_threads": threads, **timed_path(labeller, files, root, name)}
        a, b = (storage.get_bytes(storage.join(root, p, "masks", "img0.png")) for p in ("threads", "processes"))
        out["identical_mask_files"] = a == b
    return out


def gpu_end_to_end(model, samples: list[Sample], n: int, workers: int, batch_size: int) -> dict:
    """End-to-end images/s on one GPU in bf16 with five scales (host path included), model alone, MFU."""
    device = next(model.parameters()).device
    names = [f"c{k}" for k in range(K)]
    with tempfile.TemporaryDirectory(prefix="label-gpu-") as root:
        files = write_jpegs(samples, n, storage.join(root, "images"))
        labeller = Labeller(model, host_config(root, workers, 4, batch_size, "bf16"), names)
        rate = timed_path(labeller, files, root, "gpu")["images_per_s"]
    alone = model_only(model, batch_size, "bf16")
    flops = flops_per_image(model)
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in GPU_BF16_DENSE_TFLOPS.items() if k in name), None)
    return {
        "device": name,
        "end_to_end_bf16_images_per_s": rate,
        "model_alone_bf16_images_per_s": alone,
        "mfu_end_to_end": flops * rate / (peak * 1e12) if peak else None,
        "mfu_model_alone": flops * alone / (peak * 1e12) if peak else None,
        "host_workers": workers,
    }


def print_host(host: dict, cores: int) -> None:
    print(f"host ceiling, zero-cost model, 500x375 JPEG -> PNG, {host['threads']['images']} images ({cores} cores):")
    for name in ("threads", "processes"):
        r = host[name]
        print(
            f"  {name:9s} (host_workers={r['host_workers']}): {r['images_per_cpu_s']:6.1f} img/s per core, "
            f"{r['images_per_s']:6.1f} img/s wall, {r['cores_busy']:.2f} cores busy"
        )
    print(f"  mask files identical between the two: {host['identical_mask_files']}")


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
    parser.add_argument("--host-images", type=int, default=300, help="images through the host path; 0: skip it")
    parser.add_argument("--host-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--host-only", action="store_true", help="only the host ceiling (and the GPU end to end)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.host_images:
        host = host_ceiling(make_images(8), args.host_images, args.host_workers, args.threads, args.batch_size)
        print_host(host, os.cpu_count() or 1)
        print(json.dumps({"host_ceiling": host}, indent=1))
    if torch.cuda.is_available():
        model = make_models(torch.device("cuda"))[0]
        gpu = gpu_end_to_end(model, make_images(8), max(args.host_images, 64 * args.batch_size), args.host_workers, 16)
        print(json.dumps({"gpu_end_to_end": gpu}, indent=1))
    if args.host_only:
        return
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
