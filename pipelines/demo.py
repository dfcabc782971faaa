"""The whole mission on one machine, on embedded defaults: ``make demo`` / ``python -m pipelines.demo``.

    python -m pipelines.demo [--config FILE] key=value ...     (--help lists the keys)

Starts the embedded local stack (a SeaweedFS S3 server on loopback with generated credentials and
a Ray head, ``pipelines.stack``), then runs the same entry points a cluster runs, each as its own
``python -m pipelines.<name>`` process joined to that Ray head, exactly as ``ray job submit`` would:

1. ingest a synthetic train split and a held-out split (another seed: other scenes) into shards;
2. train ``configs/tiny.yaml`` on the train split with 2 DeepSpeed data-parallel workers under Ray Train;
3. label the held-out split with the exported model (``configs/label-tiny.yaml``);
4. evaluate the masks against the held-out GT masks, next to the all-background baseline;

prints a summary, copies the small artefacts (summary, contact sheet, job records) to
``<dir>/outputs/`` so they stay viewable once the stack is down, and stops what it started.

Everything lives under ``dir`` (default ``.demo``) and is reused on the next run: ingest skips
complete shards, a run whose model is exported is not trained again (its labels are then not
recomputed either), so a second ``make demo`` is quick. ``root=`` (an ``s3://`` URI for
the S3 settings in the environment, or a local folder) runs without starting an S3 server, and a set
``RAY_ADDRESS`` joins that Ray instead of starting a head.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from pipelines.entry import EXIT_INCOMPLETE, Incomplete, run_main
from pipelines.evaluate import EvaluateConfig, evaluate
from pipelines.stack import start_ray_head, start_s3
from system import storage
from system.config import dump_yaml, option, parse_cli
from system.data.shards import read_dataset
from system.label.inputs import plan_inputs, unit_samples
from system.masks import decode_mask
from system.metrics import ConfusionMatrix
from system.telemetry import setup_logging

log = logging.getLogger("pipelines.demo")
BUCKET = "clustercam"

# Held-out mIoU (lowest, highest) over training seeds 0, 1, 2 of the default recipe, measured by
# benchmarks/quality.py on this code: what a correct install prints, not a guarantee for every seed.
EXPECTED_MIOU = {"seg head": (0.77, 0.82), "CAM + PAR": (0.73, 0.84)}
# the keys the expectation depends on; anything else (dir, root, run_name, ray_cpus) does not change the figures
RECIPE_KEYS = (
    "num_classes",
    "image_size",
    "train_images",
    "heldout_images",
    "train_config",
    "label_config",
    "num_workers",
    "train",
    "label",
)


@dataclasses.dataclass
class DemoConfig:
    """Ingest, train, label and evaluate on synthetic data with the embedded local stack."""

    dir: str = option(".demo", doc="working folder (stack data and credentials, outputs/); reused by the next run")
    root: str = option(
        "", doc="storage root of every output; empty: s3://clustercam on an S3 server started in <dir>/stack"
    )
    num_classes: int = option(4, doc="synthetic classes; must equal the train config's model.num_classes")
    image_size: int = option(64, doc="synthetic image side in pixels")
    train_images: int = option(480, doc="images in the training split (synthetic seed 0)")
    heldout_images: int = option(48, doc="images in the held-out split (seed 1), labelled and evaluated")
    shard_size: int = option(60, doc="images per shard")
    train_config: str = option("configs/tiny.yaml", doc="training config file")
    label_config: str = option("configs/label-tiny.yaml", doc="labelling config file")
    run_name: str = option("demo", doc="training run name (a finished run is reused)")
    num_workers: int = option(2, doc="training workers (DeepSpeed ranks)")
    zero_stage: int = option(0, doc="DeepSpeed ZeRO stage (0: data parallel, the fast choice for a model this small)")
    train: list[str] = option(factory=list, doc="extra key=value overrides for pipelines.train")
    label: list[str] = option(factory=list, doc="extra key=value overrides for pipelines.label")
    ray_cpus: int = option(0, doc="CPUs of the Ray head the demo starts; 0: this machine's count")


@dataclasses.dataclass
class Paths:
    root: str
    labels_name: str = "demo-heldout"

    @property
    def train_data(self) -> str:
        return self.root + "/datasets/demo-train"

    @property
    def heldout_data(self) -> str:
        return self.root + "/datasets/demo-heldout"

    def run(self, name: str) -> str:
        return f"{self.root}/runs/{name}"

    @property
    def labels(self) -> str:
        return f"{self.root}/labels/{self.labels_name}"


def _run_step(name: str, module: str, args: list[str], env: dict[str, str]) -> float:
    """Run ``python -m <module> args`` as its own process (as a job would be); returns its seconds.

    A step's status follows ``pipelines.entry``, and the demo passes it on: bad input stays bad
    input, an incomplete step leaves the demo incomplete (re-running it resumes)."""
    log.info("demo: %s: python -m %s %s", name, module, " ".join(args))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", module, *args], env=env)
    if done.returncode == EXIT_INCOMPLETE:
        raise Incomplete(f"{name} did not finish (its output is above)")
    if done.returncode != 0:
        print(f"demo: {name} failed (exit {done.returncode}); its output is above", file=sys.stderr, flush=True)
        sys.exit(done.returncode)
    return time.monotonic() - t0


def background_baseline(data: str) -> dict:
    """Scores of predicting background everywhere, on the dataset's GT masks (the trivial baseline)."""
    plan = plan_inputs(data, None, None, chunk=256)
    names = ["background", *plan.class_names]
    index = {name: k for k, name in enumerate(plan.class_names)}
    cm = ConfusionMatrix(len(names))
    for unit in plan.units:
        for sample in unit_samples(unit, index):
            if sample.gt is not None:
                gt = decode_mask(sample.gt)
                cm.add(gt, np.zeros_like(gt))
    return cm.summary(names)


def _json(uri: str) -> dict:
    return json.loads(storage.get_bytes(uri))


def _history(run: str) -> list[dict]:
    return [
        json.loads(line) for line in storage.get_bytes(run + "/history.jsonl").decode().splitlines() if line.strip()
    ]


def start_stack(cfg: DemoConfig, workdir: Path, resources: ExitStack) -> tuple[str, dict[str, str], dict]:
    """(storage root, environment of the steps, what was started); starts the S3 server and Ray head it needs."""
    env = dict(os.environ)
    started: dict = {}
    root = cfg.root.rstrip("/")
    if not root:
        if (workdir / "stack" / "stack.json").exists():
            raise SystemExit(
                f"demo: infra/local/start.sh runs a stack on {workdir / 'stack'}; stop it first: "
                f"infra/local/stop.sh --dir {workdir / 'stack'}"
            )
        server = start_s3(workdir / "stack", buckets=())
        resources.callback(server.stop)
        client = server.client()
        if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=BUCKET)
        env.update(server.env())
        os.environ.update(server.env())
        root = f"s3://{BUCKET}"
        started["s3"] = {"endpoint": server.endpoint, "pid": server.pid, "data": str(workdir / "stack" / "data")}
        log.info("demo: S3 server %s (data in %s)", server.endpoint, workdir / "stack" / "data")
    if not env.get("RAY_ADDRESS"):
        # The controller of Ray Train reads this in the raylet's environment: poll reports quickly.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        head = start_ray_head(workdir / "stack", num_cpus=cfg.ray_cpus or os.cpu_count() or 2)
        resources.callback(head.stop)
        env.update(head.env(), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"])
        started["ray"] = {"address": head.address, "temp_dir": head.temp_dir}
        log.info("demo: Ray head %s", head.address)
    return root, env, started


def ingest_splits(cfg: DemoConfig, paths: Paths, env: dict[str, str]) -> dict[str, float]:
    """Ingest the synthetic train and held-out splits (complete shards are skipped); seconds per split."""
    synthetic = [
        f"source.num_classes={cfg.num_classes}",
        f"source.image_size={cfg.image_size}",
        f"shard_size={cfg.shard_size}",
        "source.format=synthetic",
        "num_workers=2",
    ]
    seconds = {}
    for name, uri, count, seed in (
        ("ingest train split", paths.train_data, cfg.train_images, 0),
        ("ingest held-out split", paths.heldout_data, cfg.heldout_images, 1),
    ):
        seconds[name] = _run_step(
            name,
            "pipelines.ingest",
            [f"output={uri}", f"source.num_images={count}", f"source.seed={seed}", *synthetic],
            env,
        )
    return seconds


def train_step(cfg: DemoConfig, paths: Paths, env: dict[str, str]) -> float | None:
    """Train ``cfg.run_name`` on the train split; seconds, or None when its exported model is reused."""
    run_uri = paths.run(cfg.run_name)
    if storage.exists(run_uri + "/model/model.json"):
        log.info("demo: %s/model exists: training skipped (run_name=<new name> trains again)", run_uri)
        return None
    return _run_step(
        "train",
        "pipelines.train",
        [
            "--config",
            cfg.train_config,
            f"data={paths.train_data}",
            f"output={paths.root}",
            f"run_name={cfg.run_name}",
            f"num_workers={cfg.num_workers}",
            f"zero_stage={cfg.zero_stage}",
            *cfg.train,
        ],
        env,
    )


def label_step(cfg: DemoConfig, paths: Paths, env: dict[str, str], retrained: bool) -> float | None:
    """Label the held-out split into ``paths.labels``; seconds, or None when a complete job is reused."""
    job_uri = paths.labels + "/label_job.json"
    if not retrained and storage.exists(job_uri) and _json(job_uri).get("complete"):
        log.info("demo: %s is complete for this model: labelling skipped", job_uri)
        return None
    return _run_step(
        "label",
        "pipelines.label",
        [
            "--config",
            cfg.label_config,
            f"model={paths.run(cfg.run_name)}/model",
            f"data={paths.heldout_data}",
            f"output={paths.labels}",
            f"overwrite={'true' if retrained else 'false'}",
            *cfg.label,
        ],
        env,
    )


def evaluate_step(paths: Paths) -> dict:
    """Scores of the masks in ``paths.labels`` against the held-out GT (also written to its eval.json)."""
    return evaluate(
        EvaluateConfig(masks=paths.labels + "/masks", data=paths.heldout_data, output=paths.labels + "/eval.json")
    )


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns the summary it prints (also in ``<root>/demo/summary.json``)."""
    t_start = time.monotonic()
    workdir = Path(cfg.dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as resources:
        root, env, started = start_stack(cfg, workdir, resources)
        paths = Paths(root)
        seconds: dict[str, float | None] = ingest_splits(cfg, paths, env)
        seconds["train"] = train_step(cfg, paths, env)
        seconds["label"] = label_step(cfg, paths, env, retrained=seconds["train"] is not None)
        t0 = time.monotonic()
        result = evaluate_step(paths)
        baseline = background_baseline(paths.heldout_data)
        seconds["evaluate"] = time.monotonic() - t0

        summary = _summary(cfg, paths, result, baseline, seconds)
        summary["seconds"]["total"] = round(time.monotonic() - t_start, 1)
        summary["stopped_at_exit"] = started
        storage.put_bytes(root + "/demo/summary.json", (json.dumps(summary, indent=1) + "\n").encode())
        summary["local_copies"] = _copy_outputs(paths, paths.run(cfg.run_name), workdir / "outputs", summary)
    _print(summary)
    return summary


def _summary(cfg: DemoConfig, paths: Paths, result: dict, baseline: dict, seconds: dict) -> dict:
    run_uri = paths.run(cfg.run_name)
    model = _json(run_uri + "/model/model.json")
    history = _history(run_uri)
    job = _json(paths.labels + "/label_job.json")
    tail = history[len(history) // 2 :] or history
    ingested = read_dataset(paths.train_data).total_samples + read_dataset(paths.heldout_data).total_samples
    ingest_s = (seconds["ingest train split"] or 0) + (seconds["ingest held-out split"] or 0)
    return {
        "miou": result["miou"],
        "baseline_all_background_miou": baseline["miou"],
        "cam_miou": job["eval"].get("cam", {}).get("miou"),
        "per_class_iou": result["iou"],
        "heldout_images": result["images"],
        "missing_masks": result["missing_masks"],
        "throughput": {
            "ingest_images_per_s_incl_start": round(ingested / ingest_s, 2) if ingest_s else None,
            "train_samples_per_s": round(float(np.median([h["samples_per_s"] for h in tail])), 2),
            "train_data_wait_s_per_step": round(float(np.mean([h["data_wait_s"] for h in tail])), 4),
            "label_images_per_s": job["timings"]["images_per_second"],
        },
        "training": {
            "steps": model.get("steps"),
            "final_loss": history[-1]["loss"] if history else None,
            "workers": cfg.num_workers,
            "zero_stage": cfg.zero_stage,
            "nodes": model.get("final_metrics", {}).get("nodes"),
        },
        "outputs": {
            "root": paths.root,
            "train_data": paths.train_data,
            "heldout_data": paths.heldout_data,
            "run": run_uri,
            "model": run_uri + "/model",
            "labels": paths.labels,
            "contact_sheet": paths.labels + "/previews/contact_sheet.png",
            "eval": paths.labels + "/eval.json",
        },
        "seconds": {k: (round(v, 1) if v is not None else "reused") for k, v in seconds.items()},
        "expected_miou": EXPECTED_MIOU if _default_recipe(cfg) else None,
    }


def _default_recipe(cfg: DemoConfig) -> bool:
    defaults = DemoConfig()
    return all(getattr(cfg, key) == getattr(defaults, key) for key in RECIPE_KEYS)


def _copy_outputs(paths: Paths, run_uri: str, local: Path, summary: dict) -> dict[str, str]:
    """The small artefacts, copied next to the stack so they stay readable once it is stopped."""
    local.mkdir(parents=True, exist_ok=True)
    copies = {
        "contact_sheet": (paths.labels + "/previews/contact_sheet.png", "contact_sheet.png"),
        "label_job": (paths.labels + "/label_job.json", "label_job.json"),
        "eval": (paths.labels + "/eval.json", "eval.json"),
        "model_json": (run_uri + "/model/model.json", "model.json"),
        "history": (run_uri + "/history.jsonl", "history.jsonl"),
    }
    written = {}
    for name, (uri, filename) in copies.items():
        if storage.exists(uri):
            (local / filename).write_bytes(storage.get_bytes(uri))
            written[name] = str(local / filename)
    written["summary"] = str(local / "summary.json")
    (local / "summary.json").write_text(json.dumps({**summary, "local_copies": written}, indent=1) + "\n")
    return written


def _print(summary: dict) -> None:
    t, out, local = summary["throughput"], summary["outputs"], summary["local_copies"]
    lines = [
        "",
        "=" * 72,
        "ClusterCAM demo summary",
        f"  held-out pseudo-label mIoU (seg head): {summary['miou']:.4f}  on {summary['heldout_images']} images",
        f"  all-background baseline mIoU:          {summary['baseline_all_background_miou']:.4f}",
        *(
            [f"  CAM + PAR pseudo-label mIoU:           {summary['cam_miou']:.4f}"]
            if summary["cam_miou"] is not None
            else []
        ),
        *(
            [
                "  expected with the default recipe (training seeds 0, 1, 2, benchmarks/quality.py): "
                + ", ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in summary["expected_miou"].items())
            ]
            if summary["expected_miou"]
            else []
        ),
        "  per-class IoU: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["per_class_iou"].items() if v is not None),
        f"  training: {summary['training']['steps']} steps, {summary['training']['workers']} workers, "
        f"ZeRO {summary['training']['zero_stage']}, final loss {summary['training']['final_loss']}",
        f"  throughput: ingest {t['ingest_images_per_s_incl_start']} img/s (incl. start-up), "
        f"train {t['train_samples_per_s']} samples/s "
        f"(data wait {t['train_data_wait_s_per_step']} s/step), label {t['label_images_per_s']} img/s",
        "  seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()),
        f"  outputs: {out['root']} (model {out['model']}, masks {out['labels']}/masks)",
        f"  contact sheet: {local.get('contact_sheet', out['contact_sheet'])}",
        f"  summary: {local['summary']}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    # `kill` as well as Ctrl-C unwinds run(), which stops the Ray head and S3 server it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cfg = parse_cli(DemoConfig, argv, prog="python -m pipelines.demo")
    Path(cfg.dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.dir) / "demo.yaml").write_text(dump_yaml(cfg))
    run_main("demo", lambda: run(cfg))


if __name__ == "__main__":
    main()
