"""Bulk pseudo-labelling: a dataset (or manifest) in, masks + stats + previews + label_job.json out.

    python -m pipelines.label [--config configs/label.yaml] key=value ...
    python -m pipelines.label model=s3://b/runs/voc/model data=s3://b/datasets/voc-train \\
        output=s3://b/labels/voc-train mode=seg scales=[0.5,1.0,1.5] batch_size=8 num_actors=4

Order of work, so that a bad input costs seconds, not a cluster hour: config and storage checks, the
model loaded once on the driver (its class count and names), the input's classes compared with it
(a mismatch stops here, before any actor exists), one listing of ``<output>/units/`` (the units
with a completion record are skipped unread; see ``system.label.records``), then the actor pool,
started only when some unit is left. Units (shards or manifest chunks) are handed out two per actor
so no actor waits for the driver. After the pool, the final pass sums the unit records into the
counts, the evaluation and ``quality.json`` (a per-class table in the log) and names the units
without a record. The driver holds counts and O(units) names, never a per-image collection.
``label_job.json`` is written last.

Joins the Ray cluster in ``RAY_ADDRESS`` (``ray job submit``) or starts a local one. Exits 0 only
when every input image has a mask or a recorded failure, 3 when work is left (``pipelines.entry``);
re-running the same command after a crash or an outage finishes the rest. ``--help`` lists every key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import itertools
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
from system.label.outputs import FAILURES_DIR, JOB_FILE, PREVIEWS_DIR, PlannedUnit, finalize_outputs
from system.label.previews import contact_sheet, png_bytes
from system.label.records import UnitsListing, list_units, quality_table
from system.model import CheckpointError, load_clustercam
from system.rejects import Reject
from system.telemetry import Progress, label_metrics, setup_logging, start_metrics_server

log = logging.getLogger("pipelines.label")
UNITS_PER_ACTOR = 2
QUALITY_FILE = "quality.json"


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
    listing = UnitsListing(frozenset(), frozenset()) if cfg.overwrite else list_units(cfg.output)
    planned: list[PlannedUnit] = []
    skipped_units = 0

    def tasks():
        """The units left to do, drawn lazily (a manifest's chunks are streamed); done ones only counted."""
        nonlocal skipped_units
        from workers.label import UnitTask

        for unit in plan.units:
            ref = unit.ref
            planned.append(PlannedUnit(ref, unit.images))
            if listing.done(ref):
                skipped_units += 1
                metrics.done_images.labels(run_id).inc(unit.images or 0)
                continue
            yield UnitTask(unit, ref, listing.was_started(ref))

    log.info(
        "label %s: %d images in %d units (%s), %d unit records already there, mode=%s -> %s",
        run_id,
        plan.total,
        plan.unit_count,
        plan.kind,
        len(listing.records),
        cfg.mode,
        cfg.output,
    )
    storage.put_bytes(storage.join(cfg.output, "label.yaml"), dump_yaml(cfg).encode())
    if cfg.metrics_port:
        start_metrics_server(cfg.metrics_port, cfg.metrics_addr)

    metrics = label_metrics()
    metrics.input_images.labels(run_id).set(plan.total)
    todo = tasks()
    first = next(todo, None)
    failures: list[dict] = []
    previews: list[tuple[str, bytes]] = []
    infos: list[dict] = []
    lost = []
    written = finished = failed_units = 0
    t_pool = time.monotonic()  # restarted once the actors are up: labelling_seconds is the pool's own time
    if first is not None:
        ray = start_ray()
        from workers.label import LabelActor, UnitResult

        gpus = (
            cfg.gpus_per_actor
            if cfg.gpus_per_actor >= 0
            else (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
        )
        actor = LabelActor.options(num_cpus=cfg.cpus_per_actor, num_gpus=gpus)
        actors = [actor.remote(cfg, names, run_id, i, model_id) for i in range(cfg.num_actors)]
        asks = {"CPU": cfg.cpus_per_actor, "GPU": gpus}
        infos = wait_placed(actors, [a.info.remote() for a in actors], cfg.actor_start_timeout_s, "label actors", asks)
        log.info("label %s: actors ready: %s", run_id, infos)
        t_pool = time.monotonic()

        progress = Progress(plan.total, "label")

        def submit(a, task):
            want = cfg.num_previews if len(previews) < cfg.num_previews else 0
            return a.label.remote(task, want)

        def done_unit(task, result: UnitResult) -> None:
            nonlocal written, finished, failed_units
            finished += 1
            written += result.written
            failed_units += sum(1 for f in result.failures if not f.get("key"))
            failures.extend(result.failures[: max(0, 1000 - len(failures))])
            previews.extend(result.previews[: cfg.num_previews - len(previews)])
            progress.update(result.images)
            metrics.done_images.labels(run_id).inc(result.images)

        def waiting(in_flight: int) -> None:
            left = plan.unit_count - skipped_units - finished
            metrics.queue_depth.labels(run_id).set(max(0, left - in_flight + max(0, in_flight - len(actors))))

        slots = [a for _ in range(UNITS_PER_ACTOR) for a in actors]
        lost = fan_out(
            itertools.chain([first], todo),
            slots,
            submit,
            done_unit,
            attempts=cfg.unit_attempts,
            on_wait=waiting,
            name=lambda task: f"unit {task.unit.index} ({task.unit.uri})",
        )
        metrics.queue_depth.labels(run_id).set(0)
        for a in actors:
            ray.kill(a)
    for item in lost:
        reason = f"unit {item.unit.unit.index} lost after {item.attempts} attempts: {item.error}"
        failures.append(Reject("", item.unit.unit.uri, "unit_lost", reason).line(run=run_id))
    failures = [r.line(run=run_id) for r in plan.rejects][:1000] + failures
    if plan.rejects:
        lines = "".join(json.dumps(r.line(run=run_id)) + "\n" for r in plan.rejects)
        storage.put_bytes(storage.join(cfg.output, FAILURES_DIR, f"part-{run_id}-driver-00000.jsonl"), lines.encode())
    pool_seconds = time.monotonic() - t_pool

    final = finalize_outputs(cfg, names, planned)
    totals = final["totals"]
    storage.put_bytes(
        storage.join(cfg.output, QUALITY_FILE),
        (json.dumps(final["quality"], indent=1, ensure_ascii=False) + "\n").encode(),
    )
    log.info("label %s: %s", run_id, quality_table(final["quality"]))
    preview_names = _write_previews(cfg.output, previews)
    counts = {
        "input": plan.total,
        "seen": totals.written + totals.skipped + totals.failed,
        "written": written,
        "skipped_existing": max(0, final["masks"] - written),
        "failed": len(plan.rejects) + totals.failed + failed_units + len(lost),
        "masks": final["masks"],
        "missing": final["missing"],
        "not_reached": final["images_undone"],
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
        and not final["units_undone"]
        and counts["missing"] == 0
        and counts["not_reached"] == 0
        and final["masks_without_stats"] == 0,
        "units": {
            "total": len(planned),
            "skipped_complete": skipped_units,
            "done": final["units_done"],
            "without_record": final["units_undone"],
        },
        "quality": QUALITY_FILE,
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
        counts["skipped_existing"],
        counts["failed"],
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
