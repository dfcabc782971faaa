"""Bulk pseudo-labelling: a dataset (or manifest) in, masks + stats + previews + label_job.json out.

    python -m pipelines.label [--config configs/label.yaml] key=value ...
    python -m pipelines.label model=s3://b/runs/voc/model data=s3://b/datasets/voc-train \\
        output=s3://b/labels/voc-train mode=seg scales=[0.5,1.0,1.5] batch_size=8 num_actors=4

Order of work, so that a bad input costs seconds, not a cluster hour: config and storage checks, the
model loaded once on the driver (its class count and names), the input's classes compared with it
(a mismatch stops here, before any actor exists), one listing of ``<output>/masks/`` (the keys to
skip), then the actor pool. Units (shards or manifest chunks) are handed out two per actor so no
actor waits for the driver. After the pool, the consistency pass lists the masks again, recovers
stats lines a killed run never flushed, sums the evaluation, and names every input image that has
neither a mask nor a failure. ``label_job.json`` is written last.

Joins the Ray cluster in ``RAY_ADDRESS`` (``ray job submit``) or starts a local one. Exits 0 only
when every input image has a mask or a recorded failure, 3 when work is left (``pipelines.entry``);
re-running the same command after a crash or an outage finishes the rest. ``--help`` lists every key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import time
import uuid

from PIL import Image

from pipelines.cluster import start_ray, wait_placed
from pipelines.entry import Incomplete, run_main
from pipelines.export import ExportConfig
from pipelines.export import run as export
from pipelines.fanout import fan_out
from system import storage
from system.config import dump_yaml, parse_cli, to_dict
from system.label.config import LabelConfig
from system.label.infer import crf_available
from system.label.inputs import ClassMismatch, plan_inputs
from system.label.outputs import FAILURES_DIR, JOB_FILE, PREVIEWS_DIR, finalize_outputs, list_mask_keys
from system.label.previews import contact_sheet, png_bytes
from system.model import CheckpointError, load_clustercam
from system.rejects import Reject
from system.telemetry import Progress, label_metrics, setup_logging, start_metrics_server

log = logging.getLogger("pipelines.label")
UNITS_PER_ACTOR = 2


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def prepare(cfg: LabelConfig):
    """Every check that can fail without a cluster: storage, model, classes, CRF extra."""
    storage.check_readable(cfg.model)
    storage.check_readable(cfg.data)
    storage.check_writable(cfg.output)
    if cfg.crf and not crf_available():
        raise ValueError(
            "crf=true needs the optional 'crf' extra: pip install -e '.[crf]' (pydensecrf2, built with a C++ compiler)"
        )
    model = load_clustercam(cfg.model)
    names = model.class_names
    if cfg.class_names:
        if names and list(names) != list(cfg.class_names):
            raise ClassMismatch(f"class_names differ from the names in {cfg.model}/model.json")
        names = list(cfg.class_names)
    plan = plan_inputs(cfg.data, model.cfg.num_classes, names, cfg.manifest_chunk)
    return model, plan


def run(cfg: LabelConfig) -> dict:
    """Run the job; returns the content of ``label_job.json``."""
    started, t0 = _now(), time.monotonic()
    cfg = dataclasses.replace(cfg, output=cfg.output.rstrip("/"))
    model, plan = prepare(cfg)
    names = plan.class_names
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    model_id = model.source_id or cfg.model
    done = (
        frozenset() if cfg.overwrite else frozenset(list_mask_keys(storage.join(cfg.output, "masks"), cfg.codec.suffix))
    )
    log.info(
        "label %s: %d images in %d units (%s), %d masks already there, mode=%s -> %s",
        run_id,
        plan.total,
        len(plan.units),
        plan.kind,
        len(done),
        cfg.mode,
        cfg.output,
    )
    storage.put_bytes(storage.join(cfg.output, "label.yaml"), dump_yaml(cfg).encode())
    if plan.rejects:
        lines = "".join(json.dumps(r.line(run=run_id)) + "\n" for r in plan.rejects)
        storage.put_bytes(storage.join(cfg.output, FAILURES_DIR, f"part-{run_id}-driver-00000.jsonl"), lines.encode())
    if cfg.metrics_port:
        start_metrics_server(cfg.metrics_port, cfg.metrics_addr)

    ray = start_ray()
    from workers.label import LabelActor, UnitResult

    gpus = (
        cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
    )
    done_ref = ray.put(done)
    actor = LabelActor.options(num_cpus=cfg.cpus_per_actor, num_gpus=gpus)
    actors = [actor.remote(cfg, names, run_id, i, done_ref, model_id) for i in range(cfg.num_actors)]
    asks = {"CPU": cfg.cpus_per_actor, "GPU": gpus}
    infos = wait_placed(actors, [a.info.remote() for a in actors], cfg.actor_start_timeout_s, "label actors", asks)
    log.info("label %s: actors ready: %s", run_id, infos)

    metrics = label_metrics()
    metrics.input_images.labels(run_id).set(plan.total)
    progress = Progress(plan.total, "label")
    seen: set[str] = set()
    failures: list[dict] = [r.line(run=run_id) for r in plan.rejects]
    previews: list[tuple[str, bytes]] = []
    written = skipped = finished = 0
    t_pool = time.monotonic()

    def submit(a, unit):
        want = cfg.num_previews if len(previews) < cfg.num_previews else 0
        return a.label.remote(unit, want)

    def done_unit(unit, result: UnitResult) -> None:
        nonlocal written, skipped, finished
        finished += 1
        seen.update(result.seen)
        written += result.written
        skipped += result.skipped
        failures.extend(result.failures)
        previews.extend(result.previews[: cfg.num_previews - len(previews)])
        progress.update(len(result.seen))
        metrics.done_images.labels(run_id).inc(len(result.seen))

    def waiting(in_flight: int) -> None:
        metrics.queue_depth.labels(run_id).set(len(plan.units) - finished - in_flight + max(0, in_flight - len(actors)))

    slots = [a for _ in range(UNITS_PER_ACTOR) for a in actors]
    lost = fan_out(
        plan.units,
        slots,
        submit,
        done_unit,
        attempts=cfg.unit_attempts,
        on_wait=waiting,
        name=lambda unit: f"unit {unit.index} ({unit.uri})",
    )
    for item in lost:
        reason = f"unit {item.unit.index} lost after {item.attempts} attempts: {item.error}"
        failures.append(Reject("", item.unit.uri, "unit_lost", reason).line(run=run_id))
    pool_seconds = time.monotonic() - t_pool
    metrics.queue_depth.labels(run_id).set(0)
    for a in actors:
        ray.kill(a)

    failed = {f["key"] for f in failures if f.get("key")}
    final = finalize_outputs(cfg, run_id, names, seen, failed)
    preview_names = _write_previews(cfg.output, previews)
    counts = {
        "input": plan.total,
        "seen": len(seen),
        "written": written,
        "skipped_existing": skipped,
        "failed": len(failures),
        "masks": final["masks"],
        "missing": final["missing"],
        "not_reached": max(0, plan.total - len(seen) - len(plan.rejects)),
        "units_lost": len(lost),
    }
    job = {
        "format": "clustercam-label-job",
        "version": 1,
        "run": run_id,
        "config": to_dict(cfg),
        "model": {"uri": cfg.model, "id": model_id, "config": dataclasses.asdict(model.cfg), "class_names": names},
        "dataset": {
            "uri": cfg.data,
            "kind": plan.kind,
            "name": plan.info.name if plan.info else None,
            "classes": names,
            "images": plan.total,
        },
        "actors": infos,
        "counts": counts,
        "complete": not lost
        and counts["missing"] == 0
        and counts["not_reached"] == 0
        and final["masks_without_stats"] == 0,
        "consistency": {
            k: final[k]
            for k in ("masks", "stats_lines", "stats_recovered", "masks_without_stats", "missing", "missing_keys")
        },
        "failures": failures[:1000],
        "eval": final["eval"],
        "previews": preview_names,
        "timings": {
            "started": started,
            "finished": _now(),
            "seconds": round(time.monotonic() - t0, 3),
            "labelling_seconds": round(pool_seconds, 3),
            "final_pass_seconds": final["seconds"],
            "images_per_second": round(written / pool_seconds, 3) if pool_seconds > 0 else None,
        },
    }
    storage.put_bytes(
        storage.join(cfg.output, JOB_FILE), (json.dumps(job, indent=1, ensure_ascii=False) + "\n").encode()
    )
    log.info(
        "label %s: %d written, %d skipped, %d failed, %d missing in %.1f s (%s/s)%s",
        run_id,
        written,
        skipped,
        len(failures),
        counts["missing"],
        pool_seconds,
        job["timings"]["images_per_second"],
        "".join(f"; {m} mIoU {e['miou']:.4f}" for m, e in final["eval"].items()),
    )
    return job


def _write_previews(output: str, previews: list[tuple[str, bytes]]) -> list[str]:
    names = []
    for key, png in previews:
        storage.put_bytes(storage.join(output, PREVIEWS_DIR, f"{key}.png"), png)
        names.append(f"{PREVIEWS_DIR}/{key}.png")
    if previews:
        tiles = [Image.open(io.BytesIO(png)).convert("RGB") for _, png in previews]
        storage.put_bytes(storage.join(output, PREVIEWS_DIR, "contact_sheet.png"), png_bytes(contact_sheet(tiles)))
        names.append(f"{PREVIEWS_DIR}/contact_sheet.png")
    return names


def run_complete(cfg: LabelConfig) -> dict:
    """``run``, raising ``Incomplete`` (exit status 3) when any input image has neither a mask nor a
    recorded failure: a scheduler that trusts the exit status never takes a partial job for done.
    A complete job then writes the exports ``cfg.export`` names (``pipelines.export``)."""
    job = run(cfg)
    if not job["complete"]:
        c = job["counts"]
        raise Incomplete(
            f"{cfg.output}: {c['missing'] + c['not_reached']} of {c['input']} images have no mask yet "
            f"({c['units_lost']} units lost, {job['consistency']['masks_without_stats']} masks without stats)"
        )
    if cfg.export:
        export(ExportConfig(job=cfg.output, formats=cfg.export))
    return job


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_cli(LabelConfig, argv, prog="python -m pipelines.label")
    run_main("label", lambda: run_complete(cfg), bad_input=(ClassMismatch, CheckpointError))


if __name__ == "__main__":
    main()
