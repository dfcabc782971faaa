"""mIoU and per-class IoU of any folder of masks against the GT masks a dataset carries.

    python -m pipelines.evaluate masks=s3://b/labels/voc-val/masks data=s3://b/datasets/voc-val \\
        [output=s3://b/labels/voc-val/eval.json]

``masks`` holds ``<key>.png`` class-index (or PASCAL-coloured) PNGs, such as a labelling job's
``masks/`` or the authors' ``--save_path``; ``data`` is a dataset (shards with ``mask.png``) or a
manifest with ``mask`` fields. The metric is the one of docs/method.md §c.3 (255 in the GT is skipped; a 255 in a
prediction counts as a miss). Images with GT but no predicted mask are counted and, by default,
scored as all-wrong so a partial mask folder cannot look better than it is. Shards are read in
parallel threads; no Ray is needed.

    python -m pipelines.evaluate job=s3://b/labels/voc-val [mode=cam]

A labelling job's own masks are evaluated from its unit records (``system.label.records``: each
holds its images' confusion sums), summed without reading a shard or a mask; when some image has
no mask (a failed image, a unit without its record) and ``missing_as_wrong`` is on, the masks are
scored the long way above, so both give the same number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.entry import run_main
from system import storage
from system.config import option, parse_cli
from system.data.convert import gt_upright
from system.label.config import LabelConfig, MaskFormat
from system.label.inputs import ClassMismatch, Unit, plan_inputs, unit_samples
from system.label.outputs import PlannedUnit, finalize_outputs, list_mask_keys, read_job
from system.masks import decode_mask, mask_codec
from system.metrics import ConfusionMatrix
from system.refine import IGNORE_INDEX
from system.telemetry import setup_logging

log = logging.getLogger("pipelines.evaluate")


@dataclasses.dataclass
class EvaluateConfig:
    """Evaluate a mask folder against a dataset's ground truth."""

    masks: str = option("", doc="folder or s3:// prefix of <key>.png masks (<key><suffix> of mask_format)")
    data: str = option("", doc="dataset URI (shards with mask.png) or manifest with a mask column")
    job: str = option("", doc="a labelling job's output: its masks scored from its unit records (masks, data unset)")
    mode: str = option("", doc="with job: seg or cam (a mode=both job's cam_masks/); empty: the job's masks/")
    output: str = option("", doc="where to write the result JSON (empty: only print it)")
    class_names: list[str] = option(
        factory=list, doc="class names, needed only for a manifest without a fixed class list"
    )
    missing_as_wrong: bool = option(
        True, doc="score images with GT but no mask as all-ignore predictions (every GT pixel a miss)"
    )
    threads: int = option(8, doc="parallel shard readers")
    mask_format: MaskFormat = option("png", doc="how the masks are stored (system.masks codecs)")

    def __post_init__(self) -> None:
        if bool(self.job) == bool(self.masks and self.data):
            raise ValueError("give either job=<labelling job output> or both masks= and data=")


def evaluate_job(cfg: EvaluateConfig) -> dict:
    """A labelling job's masks against its input's GT, from the job's unit records."""
    root = cfg.job.rstrip("/")
    job = read_job(cfg.job)
    fields = {f.name for f in dataclasses.fields(LabelConfig)}
    label = LabelConfig(**{k: v for k, v in job["config"].items() if k in fields})
    mode = cfg.mode or label.modes[-1]
    if mode not in label.modes:
        raise ValueError(f"mode={mode}: job {cfg.job} ran mode={label.mode}")
    names = job["model"]["class_names"]
    plan = plan_inputs(label.data, len(names), names, label.manifest_chunk)
    final = finalize_outputs(label, names, [PlannedUnit(u.ref, u.images) for u in plan.units])
    missing = final["totals"].failed + final["images_undone"] + final["missing"]
    if missing and cfg.missing_as_wrong:
        masks = storage.join(root, label.mask_dir(mode))
        return evaluate(dataclasses.replace(cfg, job="", masks=masks, data=label.data, mask_format=label.mask_format))
    if mode not in final["eval"]:
        raise ValueError(f"{label.data}: no image with a GT mask and a predicted mask in job {cfg.job}")
    result = {
        "masks": storage.join(root, label.mask_dir(mode)),
        "data": label.data,
        "images": final["eval"][mode]["images"],
        "missing_masks": missing,
        **{k: v for k, v in final["eval"][mode].items() if k != "images"},
        "from": "unit records",
    }
    if cfg.output:
        storage.put_bytes(cfg.output, (json.dumps(result, indent=1) + "\n").encode())
    return result


def evaluate(cfg: EvaluateConfig) -> dict:
    if cfg.job:
        return evaluate_job(cfg)
    storage.check_readable(cfg.data)
    masks_root = cfg.masks.rstrip("/")
    codec = mask_codec(cfg.mask_format)
    available = list_mask_keys(masks_root, codec.suffix)
    plan = plan_inputs(cfg.data, None, cfg.class_names or None, chunk=256)
    names = plan.class_names
    index = {name: k for k, name in enumerate(names)}
    n = len(names) + 1

    def one_unit(unit: Unit) -> tuple[ConfusionMatrix, int, int]:
        cm, scored, missing = ConfusionMatrix(n), 0, 0
        for sample in unit_samples(unit, index):
            if sample.error or sample.gt is None:
                continue
            gt = gt_upright(decode_mask(sample.gt), sample.image) if sample.image else decode_mask(sample.gt)
            if sample.key in available:
                pred = codec.decode(storage.get_bytes(storage.join(masks_root, sample.key + codec.suffix)))
                if pred.shape != gt.shape:
                    raise ValueError(
                        f"{masks_root}/{sample.key}{codec.suffix} is {pred.shape[1]}x{pred.shape[0]}, "
                        f"GT {gt.shape[1]}x{gt.shape[0]}"
                    )
            elif cfg.missing_as_wrong:
                pred = np.full_like(gt, IGNORE_INDEX)
                missing += 1
            else:
                missing += 1
                continue
            cm.add(gt, pred)
            scored += 1
        return cm, scored, missing

    total, scored, missing = ConfusionMatrix(n), 0, 0
    with ThreadPoolExecutor(cfg.threads) as pool:
        for cm, s, m in pool.map(one_unit, plan.units):
            total.merge(cm)
            scored += s
            missing += m
    if not scored:
        raise ValueError(
            f"{cfg.data}: no image with a GT mask{' and a predicted mask' if not cfg.missing_as_wrong else ''}"
        )
    result = {
        "masks": cfg.masks,
        "data": cfg.data,
        "images": scored,
        "missing_masks": missing,
        **total.summary(["background", *names]),
    }
    if cfg.output:
        storage.put_bytes(cfg.output, (json.dumps(result, indent=1) + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_cli(EvaluateConfig, argv, prog="python -m pipelines.evaluate")
    run_main("evaluate", lambda: print(json.dumps(evaluate(cfg), indent=1)), bad_input=(ClassMismatch,))


if __name__ == "__main__":
    main()
