"""The README is executable documentation: its commands are the ones the code accepts, its cluster
commands run against a real `ray start --head`, and its generated reference matches the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import docs
from system import storage
from tests.commands import REPO, check_entry_point, entry_point, shell_lines
from tests.raycluster import RAY, LocalCluster, local_cluster_env

README = (REPO / "README.md").read_text()
SITE_SETTINGS = "export RAY_ADDRESS=http://127.0.0.1:8265 ROOT=s3://my-bucket/clustercam PY=python"
# Appended to the README's cluster commands so the test runs in seconds; the README's own keys stay.
TEST_SIZE = {
    "pipelines.ingest": ["source.num_images=12", "shard_size=6", "num_workers=2"],
    "pipelines.train": ["max_steps=2", "schedule.steps_per_epoch=2", "stream.batch_size=2", "stream.num_workers=0"],
    "pipelines.label": ["scales=[1.0]", "cam_scales=[1.0]", "num_previews=2"],
}


def _blocks(text: str = README) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README lacks the section {title!r}"
    return match.group(1)


def _cluster_commands() -> list[str]:
    (block,) = [b for b in _blocks(_section("Running on a cluster")) if SITE_SETTINGS in b]
    commands = shell_lines(block)
    assert commands[0] == SITE_SETTINGS
    return commands[1:]


def test_setup_comes_first_with_the_two_commands_and_ci_runs_the_test_command():
    first = re.search(r"^## (.+)$", README, re.M).group(1)
    assert first.startswith("Set-up and tests")
    commands = shell_lines(_blocks(_section(first))[0])
    assert commands == ["make test", "make demo"]
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["make test"]
    makefile = (REPO / "Makefile").read_text()
    for target in ("test", "demo", "venv", "docs"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks {target}"
    assert re.search(r"^demo: venv\n\t\$\(BIN\)/python -m pipelines\.demo", makefile, re.M)


def test_generated_reference_sections_match_the_code():
    assert docs.stale_sections(README) == []
    for _, cls, _ in docs.CONFIGS:
        assert f"({cls.__name__}," in README


def test_docs_check_names_a_stale_section(tmp_path):
    stale = README.replace("| `run_name` |", "| `run_nam` |", 1)
    assert docs.stale_sections(stale) == ["config-reference"]
    path = tmp_path / "README.md"
    path.write_text(stale)
    with pytest.raises(SystemExit, match="config-reference"):
        docs.main(["--check", "--readme", str(path)])
    docs.main(["--readme", str(path)])
    assert path.read_text() == README


def test_every_entry_point_command_in_the_readme_parses():
    checked = set()
    for block in _blocks():
        for command in shell_lines(block):
            found = entry_point(command.replace("$ROOT", "s3://b/r").replace("$PY", "python"))
            if found:
                check_entry_point(*found)
                checked.add(found[0])
    assert {"pipelines.ingest", "pipelines.train", "pipelines.label", "pipelines.evaluate", "pipelines.demo"} <= checked


def test_paths_and_make_targets_named_in_the_readme_exist():
    for path in set(re.findall(r"(?<![\w/])((?:infra|configs|pipelines|system|workers|tests)/[\w./-]*\w)", README)):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    for target in set(re.findall(r"(?:`|^)make (\w+)", README, re.M)):
        assert re.search(rf"^{target}:", (REPO / "Makefile").read_text(), re.M), f"make {target}"


@pytest.fixture
def ray_head(s3_server, tmp_path):
    """`ray start --head` with the dashboard's job API, on loopback, with token auth."""
    cluster = LocalCluster(tmp_path, local_cluster_env(tmp_path))
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_readme_cluster_commands_run_with_ray_job_submit(ray_head, s3_root):
    commands = _cluster_commands()
    assert [entry_point(c)[0] for c in commands] == ["pipelines.ingest", "pipelines.train", "pipelines.label"]
    env = {
        **ray_head.env,
        "RAY_ADDRESS": ray_head.dashboard,
        "ROOT": s3_root,
        "PY": sys.executable,
        "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}",
    }
    for command in commands:
        assert command.startswith("ray job submit --runtime-env infra/ray/job-runtime-env.yaml -- $PY -m pipelines.")
        module = entry_point(command)[0]
        line = command + " " + " ".join(shlex.quote(a) for a in TEST_SIZE[module])
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
        )
        assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, (
            f"{module}:\n" + done.stdout[-3000:] + done.stderr[-3000:]
        )
    info = json.loads(storage.get_bytes(s3_root + "/datasets/synthetic/dataset.json"))
    assert info["total_samples"] == 12 and len(info["classes"]) == 4
    model = json.loads(storage.get_bytes(s3_root + "/runs/tiny-cluster/model/model.json"))
    assert model["steps"] == 2 and len(model["final_metrics"]["nodes"]) == 2
    job = json.loads(storage.get_bytes(s3_root + "/labels/synthetic/label_job.json"))
    assert job["complete"] and job["counts"]["masks"] == 12 and "seg" in job["eval"]
    # the key reached the jobs through the nodes' environment only: not in the job API, nor in any file
    # of the Ray session (runtime-env agent log, job infos, every worker's log)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    listing = subprocess.run([RAY, "job", "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "pipelines.label" in listing.stdout and secret not in listing.stdout
    files = [p for d in ray_head.temp_dirs for p in Path(d).rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "runtime_env_agent.log" for p in files)
    assert [str(p) for p in files if secret.encode() in p.read_bytes()] == []
