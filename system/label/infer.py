"""Images in, label maps out: decode, size for the model, batch by size, run seg and/or cam.

Throughput comes from three things: images of the same (capped) size share a forward (the model's
token grid depends on the size, so only equal sizes batch without padding, and padding would change
the positional embedding and the masks); decoding runs in the actor's host pool while the model runs
(threads, or worker processes where the GIL binds: ``system.label.hostpool``), bounded so a shard
never sits decoded in memory; bf16 autocast where the hardware computes bf16 natively. The maths is
the library's: ``predict_probs`` (docs/method.md §c.1) and ``multi_scale_cam`` + ``pseudo_labels``
(docs/method.md §b.4-b.7); nothing here changes a pixel's value except the optional tag restriction
(zeroing classes the image is not tagged with) and the CRF.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from system import hardware
from system.cam import CAM_LAYERS, CAM_P2P_REFINE, multi_scale_cam, predict_probs
from system.data.convert import mask_upright
from system.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_normalised, to_rgb
from system.label.config import LabelConfig
from system.label.inputs import Sample
from system.masks import decode_mask
from system.refine import IGNORE_INDEX, denormalize, pseudo_labels
from system.rejects import Reject

T = TypeVar("T")
_MEAN_255 = tuple(255 * m for m in IMAGENET_MEAN)
_STD_255 = tuple(255 * s for s in IMAGENET_STD)


@dataclasses.dataclass
class Decoded:
    sample: Sample
    pixels: np.ndarray  # (H, W, 3) uint8 at the original size
    resized: np.ndarray  # (h, w, 3) uint8 at the model size (the same array when no resize)
    gt: np.ndarray | None

    @property
    def size(self) -> tuple[int, int]:
        return self.resized.shape[:2]


@dataclasses.dataclass
class Labelled:
    sample: Sample
    pixels: np.ndarray
    gt: np.ndarray | None
    masks: dict[str, np.ndarray]  # mode -> (H, W) uint8 in {0..K, 255}
    confidence: dict[str, float]
    model_size: tuple[int, int]
    class_confidence: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # mode -> value -> mean


def model_size(height: int, width: int, max_side: int, min_side: int) -> tuple[int, int]:
    """Size the model sees: longer side capped at ``max_side``, shorter side at least ``min_side``."""
    scale = min(1.0, max_side / max(height, width))
    if min(height, width) * scale < min_side:
        scale = min_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_input(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 ImageNet-normalised, on the pixels' device.

    The labeller ships uint8 to the device and normalises there: a quarter of the transfer, and on a
    GPU host the CPU work per image drops to the JPEG decode. (The authors normalise in float64 and
    then cast; float32 arithmetic differs from that by at most one unit in the last place.) The result
    is contiguous: convolution kernels are picked by memory layout, and a channels-last view (what the
    transpose alone gives, with a batch stride that depends on how the batch was stacked) rounds
    differently, so the same image would get a different mask alone than in a batch.
    """
    x = torch.as_tensor(pixels).movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.tensor(_MEAN_255, device=x.device).view(3, 1, 1)
    std = torch.tensor(_STD_255, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def decode_sample(sample: Sample, max_side: int, min_side: int) -> Decoded | Reject:
    """Bytes to pixels at the original and the model size; a module function of plain data, so it runs
    in a host worker process (``system.label.hostpool``) as well as in a thread."""
    if sample.error:
        return sample.error
    try:
        done = decode_normalised(sample.image, upright=True)  # a manifest's files are read as they are
        image = to_rgb(done.image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return sample.reject("corrupt", f"unreadable image ({type(exc).__name__}: {exc})")
    pixels = np.asarray(image, dtype=np.uint8)
    H, W = pixels.shape[:2]
    h, w = model_size(H, W, max_side, min_side)
    resized = pixels if (h, w) == (H, W) else np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    gt = None
    if sample.gt is not None:
        try:
            gt = mask_upright(decode_mask(sample.gt), done)
        except (OSError, ValueError) as exc:
            return sample.reject("mask_corrupt", f"unreadable GT mask ({exc})")
        if gt.shape != (H, W):
            return sample.reject("mask_size", f"GT mask is {gt.shape[1]}x{gt.shape[0]}, image {W}x{H}")
    return Decoded(sample, pixels, resized, gt)


def size_batches(
    items: Iterable[T], size_of: Callable[[T], Hashable], batch_size: int, max_held: int
) -> Iterator[list[T]]:
    """Group items of equal size into batches, holding at most ``max_held`` back.

    A full bucket leaves at once; when too many images wait in half-full buckets the fullest one
    leaves early, so mixed-size inputs (COCO) cost a few short batches instead of unbounded memory.
    """
    buckets: dict[Hashable, list[T]] = {}
    held = 0
    for item in items:
        bucket = buckets.setdefault(size_of(item), [])
        bucket.append(item)
        held += 1
        if len(bucket) >= batch_size:
            held -= len(bucket)
            yield buckets.pop(size_of(item))
        elif held >= max_held:
            fullest = max(buckets, key=lambda s: len(buckets[s]))
            held -= len(buckets[fullest])
            yield buckets.pop(fullest)
    for size in list(buckets):
        yield buckets.pop(size)


def class_confidence(labels: torch.Tensor, conf: torch.Tensor) -> dict[int, float]:
    """Mean confidence of each label value's pixels (at the model size; ignore pixels have none)."""
    known = ~torch.isnan(conf)
    values = labels[known].long().flatten()
    sums = torch.bincount(values, weights=conf[known].double().flatten(), minlength=256)
    counts = torch.bincount(values, minlength=256)
    return {int(v): float(sums[v] / counts[v]) for v in torch.nonzero(counts).flatten()}


def dense_crf(pixels: np.ndarray, probs: np.ndarray, iterations: int = 10) -> np.ndarray:
    """docs/method.md §c.1 step 3: DenseCRF2D, Gaussian sxy 4 compat 3, bilateral sxy 83 srgb 5 compat 3."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise RuntimeError("crf=true needs the optional 'crf' extra: pip install -e '.[crf]' (pydensecrf2)") from None
    n, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32), clip=1e-5)))
    crf.addPairwiseGaussian(sxy=4, compat=3)
    crf.addPairwiseBilateral(sxy=83, srgb=5, rgbim=np.array(pixels, dtype=np.uint8, order="C"), compat=3)
    return np.argmax(np.array(crf.inference(iterations)).reshape(n, h, w), axis=0).astype(np.uint8)


def crf_available() -> bool:
    return importlib.util.find_spec("pydensecrf") is not None


class Labeller:
    """One model on one device turning samples into label maps (no I/O besides decoding bytes)."""

    def __init__(self, model: torch.nn.Module, cfg: LabelConfig, class_names: list[str]):
        self.model = model
        self.cfg = cfg
        self.class_names = list(class_names)
        self.num_classes = model.cfg.num_classes
        self.device = next(model.parameters()).device
        self.precision = hardware.resolve_precision(cfg.precision, self.device)
        trained = getattr(model, "cam_settings", {})
        self.cam_layers = cfg.cam_layers if cfg.cam_layers is not None else trained.get("layers", CAM_LAYERS)
        self.cam_p2p_refine = (
            cfg.cam_p2p_refine if cfg.cam_p2p_refine is not None else trained.get("p2p_refine", CAM_P2P_REFINE)
        )
        scales = [*(cfg.scales if "seg" in cfg.modes else []), *(cfg.cam_scales if "cam" in cfg.modes else [])]
        # every scaled copy must hold at least one patch (int() truncates, hence the ceil)
        self.min_side = math.ceil(model.cfg.patch_size / min(min(scales), 1.0))

    def decode(self, sample: Sample) -> Decoded | Reject:
        return decode_sample(sample, self.cfg.max_side, self.min_side)

    def _tags(self, batch: list[Decoded]) -> torch.Tensor:
        tags = torch.zeros(len(batch), self.num_classes, device=self.device)
        for i, item in enumerate(batch):
            tags[i, list(item.sample.labels)] = 1
        return tags

    def seg(self, x: torch.Tensor, tags: torch.Tensor, pixels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,h,w) labels and confidences: argmax of the multi-scale probabilities (docs/method.md §c.1)."""
        with hardware.autocast(self.precision, self.device):
            probs = predict_probs(self.model, x, self.cfg.scales).float()
        if self.cfg.restrict_to_tags:
            allowed = torch.cat([torch.ones_like(tags[:, :1]), tags], dim=1)
            probs = probs * allowed[:, :, None, None]
        conf, labels = probs.max(dim=1)
        if self.cfg.crf:
            labels = torch.stack(
                [torch.from_numpy(dense_crf(px, p.cpu().numpy())).to(labels) for px, p in zip(pixels, probs)]
            )
        return labels, conf

    def cam(self, x: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,h,w) PAR pseudo labels (docs/method.md §b.7) and confidences (tag CAM of the winner; 1 - max for bg)."""
        with hardware.autocast(self.precision, self.device):
            cams = multi_scale_cam(self.model, x, self.cfg.cam_scales, self.cam_layers, self.cam_p2p_refine)
        cams = cams.float() * tags[:, :, None, None]
        labels = pseudo_labels(denormalize(x), cams, tags, self.cfg.bg_threshold, self.cfg.ignore_delta)
        top = cams.max(dim=1).values
        fg = torch.gather(cams, 1, (labels - 1).clamp(0, self.num_classes - 1).unsqueeze(1)).squeeze(1)
        conf = torch.where(labels == 0, 1 - top, fg).masked_fill(labels == IGNORE_INDEX, float("nan"))
        return labels, conf

    @torch.inference_mode()
    def run(self, batch: list[Decoded]) -> list[Labelled | Reject]:
        """Label one same-size batch; a failing batch is retried image by image so one bad image fails alone."""
        try:
            return self._run(batch)
        except (RuntimeError, ValueError) as exc:
            if len(batch) > 1:
                return [out for item in batch for out in self.run([item])]
            return [batch[0].sample.reject("model_failed", f"model failed ({type(exc).__name__}: {str(exc)[:300]})")]

    def _run(self, batch: list[Decoded]) -> list[Labelled | Reject]:
        x = to_input(torch.from_numpy(np.stack([item.resized for item in batch])).to(self.device))
        tags = self._tags(batch)
        h, w = x.shape[-2:]
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for mode in self.cfg.modes:
            if mode == "seg":
                outputs[mode] = self.seg(x, tags, [item.resized for item in batch] if self.cfg.crf else [])
            else:
                outputs[mode] = self.cam(x, tags)
        results: list[Labelled | Reject] = []
        for i, item in enumerate(batch):
            H, W = item.pixels.shape[:2]
            masks, confidence, per_class = {}, {}, {}
            for mode, (labels, conf) in outputs.items():
                per_class[mode] = class_confidence(labels[i], conf[i].float())
                mask = labels[i].to(torch.uint8).cpu().numpy()
                if (h, w) != (H, W):
                    mask = np.asarray(Image.fromarray(mask).resize((W, H), Image.NEAREST))
                masks[mode] = mask
                c = conf[i].float()
                confidence[mode] = float(c.nanmean()) if not torch.isnan(c).all() else float("nan")
            results.append(Labelled(item.sample, item.pixels, item.gt, masks, confidence, (int(h), int(w)), per_class))
        return results

    def label(
        self, samples: Iterable[Sample], pool: Executor, on_batch: Callable[[int, float], None] | None = None
    ) -> Iterator[Labelled | Reject]:
        """The whole per-unit pipeline: decode in ``pool`` ahead of the model, batch by size, run."""
        window = 4 * self.cfg.batch_size

        def decoded() -> Iterator[Decoded | Reject]:
            pending: deque = deque()
            for sample in samples:
                pending.append(pool.submit(decode_sample, sample, self.cfg.max_side, self.min_side))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

        def good() -> Iterator[Decoded]:
            for item in decoded():
                if isinstance(item, Reject):
                    failures.append(item)
                else:
                    yield item

        failures: list[Reject] = []
        for batch in size_batches(good(), lambda d: d.size, self.cfg.batch_size, window):
            yield from failures
            failures.clear()
            start = time.perf_counter()
            out = self.run(batch)
            if on_batch:
                on_batch(len(batch), time.perf_counter() - start)
            yield from out
        yield from failures
