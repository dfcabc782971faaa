"""Transient faults never end a job, and no entry point exits 0 with its output incomplete.

The exit-status convention (``pipelines.entry``): 0 complete, 2 bad input, 3 incomplete (re-running
finishes it). Faults are real: an S3 endpoint nobody listens on, Ray tasks that fail, and the S3
server killed and restarted under a running labelling job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from pipelines.fanout import fan_out
from pipelines.stack import free_ports, start_s3
from system import storage
from system.label.outputs import list_mask_keys
from tests.commands import REPO
from tests.test_label import export_tiny, synthetic_sample, write_dataset


def _entry(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


@ray.remote(num_cpus=0.1)
def _flaky(unit: str, marks: str) -> str:
    mark = Path(marks, unit)
    if unit == "broken" or not mark.exists():
        mark.touch()
        raise ConnectionResetError(104, f"reset while writing {unit}")
    return unit.upper()


def test_fan_out_requeues_failed_units_and_returns_those_that_keep_failing(ray_cluster, tmp_path):
    done: dict[str, str] = {}
    units = ["a", "b", "broken", "c"]
    lost = fan_out(
        units,
        slots=range(2),
        submit=lambda _, u: _flaky.remote(u, str(tmp_path)),
        on_done=done.__setitem__,
        attempts=3,
        backoff_s=0.05,
    )
    assert done == {"a": "A", "b": "B", "c": "C"}, "each flaky unit succeeds on its second call"
    assert [(item.unit, item.attempts) for item in lost] == [("broken", 3)]
    assert "ConnectionResetError" in lost[0].error and "reset while writing broken" in lost[0].error


def test_bad_input_exits_2_with_one_line_naming_it(tmp_path):
    missing = tmp_path / "absent"
    done = _entry("pipelines.evaluate", f"masks={missing}/masks", f"data={missing}")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate: error:") and str(missing) in last and "Traceback" not in done.stderr
    done = _entry("pipelines.label", f"model={missing}/model", f"data={missing}", f"output={tmp_path}/out")
    assert done.returncode == 2 and str(missing) in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]


def test_an_unreachable_object_store_exits_3_and_says_a_rerun_finishes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports(1)[0]}",
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
        AWS_DEFAULT_REGION="us-east-1",
    )
    done = _entry(
        "pipelines.ingest", "output=s3://bucket/datasets/x", "source.format=synthetic", "source.num_images=4", env=env
    )
    assert done.returncode == 3, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ingest: incomplete:") and "re-running the same command finishes it" in last


@pytest.mark.parametrize(
    "module", ["pipelines.ingest", "pipelines.train", "pipelines.label", "pipelines.evaluate", "pipelines.select"]
)
def test_a_config_error_exits_2(module):
    done = _entry(module, "no_such_key=1")
    assert done.returncode == 2 and "no_such_key" in done.stderr, done.stderr[-2000:]


def _masks(output: str) -> set[str]:
    return list_mask_keys(storage.join(output, "masks"))


@pytest.mark.slow
def test_s3_killed_and_restarted_under_a_labelling_job_never_leaves_it_incomplete_with_status_0(tmp_path):
    folder = tmp_path / "s3"
    server = start_s3(folder, buckets=("outage",))
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in server.env().items():
                env.setenv(key, value)
            root = "s3://outage/job"
            write_dataset(f"{root}/data", [synthetic_sample(i)[:2] for i in range(24)], shard_size=4)
            model = export_tiny(f"{root}/model")
            job_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            args = [
                f"model={model}",
                f"data={root}/data",
                f"output={root}/out",
                "scales=[0.5,1.0,1.5]",
                "batch_size=1",
                "num_actors=1",
                "precision=fp32",
                "flush_every=4",
                "threads_per_actor=1",
            ]
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.label", *args],
                cwd=REPO,
                env=job_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                deadline = time.monotonic() + 240
                while len(_masks(f"{root}/out")) < 3:
                    assert proc.poll() is None, proc.stdout.read()[-3000:]
                    assert time.monotonic() < deadline, "the job wrote no masks in time"
                    time.sleep(0.2)
                os.killpg(server.pid, signal.SIGKILL)  # the server's whole session, as a crash would
                time.sleep(6)
                server = start_s3(folder, ports=server.ports)
                out, _ = proc.communicate(timeout=420)
            finally:
                proc.kill()
            rerun = None
            if proc.returncode != 0:
                assert proc.returncode == 3, out[-3000:]
                assert "re-running the same command finishes it" in out.strip().splitlines()[-1]
                rerun = subprocess.run(
                    [sys.executable, "-m", "pipelines.label", *args],
                    cwd=REPO,
                    env=job_env,
                    capture_output=True,
                    text=True,
                    timeout=420,
                )
                assert rerun.returncode == 0, rerun.stderr[-3000:]
            job = json.loads(storage.get_bytes(f"{root}/out/label_job.json"))
            assert job["complete"] and job["counts"]["failed"] == 0, job["failures"][:3]
            assert _masks(f"{root}/out") == {synthetic_sample(i)[0] for i in range(24)}
    finally:
        server.stop()
