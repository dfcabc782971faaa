"""Transient faults never end a job, and no entry point exits 0 with its output incomplete.

The exit-status convention (``pipelines.entry``): 0 complete, 2 bad input, 3 incomplete (re-running
finishes it). Faults are real: an S3 endpoint nobody listens on, Ray tasks that fail, and the S3
server killed and restarted under a running labelling job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from pipelines.fanout import fan_out
from pipelines.stack import free_ports
from tests.commands import REPO


def _entry(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=300)


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
    lost = fan_out(units, slots=range(2), submit=lambda _, u: _flaky.remote(u, str(tmp_path)),
                   on_done=done.__setitem__, attempts=3, backoff_s=0.05)
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
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports(1)[0]}", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
               AWS_DEFAULT_REGION="us-east-1")
    done = _entry("pipelines.ingest", "output=s3://bucket/datasets/x", "source.format=synthetic", "source.num_images=4",
                  env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ingest: incomplete:") and "re-running the same command finishes it" in last


@pytest.mark.parametrize("module", ["pipelines.ingest", "pipelines.train", "pipelines.label", "pipelines.evaluate"])
def test_a_config_error_exits_2(module):
    done = _entry(module, "no_such_key=1")
    assert done.returncode == 2 and "no_such_key" in done.stderr, done.stderr[-2000:]
