"""Labelling asks Ray for what its config says and never waits forever for actors the cluster cannot
place: an autoscaling cluster gets a demand it can scale up for, a cluster that cannot meet it gets a
clear stop instead of a hung job (real local Ray without GPUs, real SeaweedFS)."""

from __future__ import annotations

import os
import time

import pytest

from pipelines.entry import BadInput
from pipelines.label import run
from system.label.config import LabelConfig
from tests.test_label import export_tiny, synthetic_sample, write_dataset

pytestmark = pytest.mark.slow


def test_label_actors_asking_for_gpus_on_a_cluster_without_any_stop_naming_what_they_asked_for(s3_bucket, ray_cluster):
    root = f"s3://{s3_bucket}/placement-{os.getpid()}"
    write_dataset(f"{root}/data", [synthetic_sample(i)[:2] for i in range(2)], shard_size=2)
    cfg = LabelConfig(
        model=export_tiny(f"{root}/model"),
        data=f"{root}/data",
        output=f"{root}/out",
        num_actors=2,
        gpus_per_actor=1,
        actor_start_timeout_s=3,
        precision="fp32",
    )
    start = time.monotonic()
    with pytest.raises(BadInput) as stopped:
        run(cfg)
    assert time.monotonic() - start < 60
    message = str(stopped.value)
    assert "2 of 2 label actors could not be placed within 3 s: each asks for CPU=0.5, GPU=1;" in message
    assert "gpus_per_actor=0" in message
