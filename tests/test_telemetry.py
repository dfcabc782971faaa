"""Prometheus series of a training worker, served on loopback, and progress lines with rate and ETA."""

from __future__ import annotations

import socket
import urllib.request

import torch

from system.model.spec import get_spec
from system.telemetry import Progress, start_metrics_server, start_metrics_server_in_range, train_metrics
from system.training import MetricsConfig
from workers.train import StepTelemetry, record_step


def test_training_step_metrics_are_served():
    port = start_metrics_server(0)
    row = {"lr": 1e-4, "loss": 1.5, "loss_cls": 0.7, "loss_pat": 0.6, "loss_seg": None}
    record_step(
        train_metrics(),
        ("voc-1", "7"),
        row,
        step_time=0.5,
        wait=0.1,
        samples=8,
        device=torch.device("cpu"),
        terms=get_spec("authors").loss_terms,
    )
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'clustercam_train_samples_total{rank="7",run="voc-1"} 8.0' in body
    assert 'clustercam_train_samples_per_second{rank="7",run="voc-1"} 16.0' in body
    assert 'clustercam_train_loss{rank="7",run="voc-1",term="cls"} 0.7' in body
    assert 'term="seg"' not in body
    assert 'clustercam_data_wait_seconds_count{rank="7",run="voc-1"} 1.0' in body
    assert 'clustercam_train_learning_rate{rank="7",run="voc-1"} 0.0001' in body


def test_progress_rate_and_eta_ignore_work_done_before_a_resume():
    now = [100.0]
    lines: list[str] = []
    progress = Progress(100, "steps", log=lines.append, every_s=5, clock=lambda: now[0], start=40)
    now[0] += 10
    progress.update(20)
    assert lines == ["steps: 60/100 (60.0%) 2.00/s ETA 20s"]
    now[0] += 1
    progress.update(1)
    assert len(lines) == 1  # not before every_s


def test_processes_sharing_a_node_take_the_next_free_port_of_the_declared_range():
    first = start_metrics_server(0)  # a port now taken: the range starts on it
    second = start_metrics_server_in_range(first, 3)
    assert second is not None and first < second < first + 3
    assert "clustercam_" in urllib.request.urlopen(f"http://127.0.0.1:{second}/metrics", timeout=10).read().decode()
    assert start_metrics_server_in_range(first, 1) is None, "a full range leaves the process unscraped, not failed"


def _port_with_free_neighbour() -> int:
    """A free port whose neighbour is free too (checked, then released: other tests' servers come and go)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base
    raise RuntimeError("no two neighbouring free ports on 127.0.0.1")


def test_a_training_rank_serves_on_port_plus_its_local_rank_with_run_and_global_rank_labels():
    base = start_metrics_server(_port_with_free_neighbour())  # local rank 0's port; local rank 1 binds the next
    telemetry = StepTelemetry(
        MetricsConfig(port=base), "voc-2", 9, 1, 10, 0, torch.device("cpu"), get_spec("authors").loss_terms
    )
    telemetry.epoch(3)
    body = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=10).read().decode()
    assert 'clustercam_train_epoch{rank="9",run="voc-2"} 3.0' in body
