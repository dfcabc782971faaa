"""The local stack CLI (`python -m pipelines.stack`, behind infra/local/*.sh): start, env, a job, stop."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def stack(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "pipelines.stack", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def exported(text: str) -> dict[str, str]:
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in text.splitlines())


@pytest.fixture
def started(tmp_path):
    folder = tmp_path / "stack"
    out = stack("start", "--dir", str(folder), "--ray", "--ray-cpus", "1", "--bucket", "ccstack")
    try:
        yield folder, out
    finally:
        if (folder / "stack.json").exists():
            stack("stop", "--dir", str(folder))


def test_stack_start_env_job_and_stop(started):
    folder, out = started
    state = json.loads((folder / "stack.json").read_text())
    assert "s3://ccstack" in out and state["ray"]["dashboard"] in out
    env = exported(stack("env", "--dir", str(folder)))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "RAY_ADDRESS"} <= env.keys()
    assert oct((folder / "ray-token").stat().st_mode & 0o777) == "0o600"

    # a job through the head's job server writes to the stack's S3 with the exported credentials
    job_env = dict(os.environ, **env)
    job_env.pop("RAY_ADDRESS")
    code = "from system import storage; storage.put_bytes('s3://ccstack/hello.txt', b'hi')"
    job = subprocess.run([RAY, "job", "submit", "--address", state["ray"]["dashboard"], "--", sys.executable, "-c", code],
                         cwd=REPO, env=job_env, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    check = "from system import storage; print(storage.get_bytes('s3://ccstack/hello.txt').decode())"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO, env=job_env, capture_output=True,
                          text=True, timeout=60).stdout.strip() == "hi"

    assert "stopped the stack" in stack("stop", "--dir", str(folder))
    assert not (folder / "stack.json").exists() and (folder / "data").is_dir()
    assert not Path(state["ray"]["temp_dir"]).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(state["s3"]["pid"], 0)
