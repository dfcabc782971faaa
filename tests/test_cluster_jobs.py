"""The multi-node path users take: `ray start` on two nodes, `ray job submit` of the training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from system import storage
from tests.datasets import build_synthetic
from tests.raycluster import RAY, LocalCluster, local_cluster_env


@pytest.fixture
def two_node_cluster(s3_server, tmp_path):
    cluster = LocalCluster(tmp_path, local_cluster_env(tmp_path))
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node("127.0.0.3", num_cpus=1)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


def test_ray_job_submit_trains_one_worker_per_node(two_node_cluster, s3_root):
    data = s3_root + "/datasets/synthetic"
    build_synthetic(data, num_images=16, num_classes=4, image_size=64, shard_size=4)
    command = [
        RAY,
        "job",
        "submit",
        f"--address={two_node_cluster.dashboard}",
        "--runtime-env=infra/ray/job-runtime-env.yaml",
        "--",
        sys.executable,
        "-m",
        "pipelines.train",
        "--config",
        "configs/tiny.yaml",
        f"data={data}",
        f"output={s3_root}",
        "run_name=submitted",
        "num_workers=2",
        "placement_strategy=SPREAD",
        "max_steps=2",
        "schedule.steps_per_epoch=2",
        "stream.batch_size=2",
        "stream.num_workers=0",
    ]
    done = subprocess.run(command, env=two_node_cluster.env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    meta = json.loads(storage.get_bytes(s3_root + "/runs/submitted/model/model.json"))
    assert meta["steps"] == 2
    assert sorted(meta["final_metrics"]["nodes"]) == ["127.0.0.2", "127.0.0.3"]
