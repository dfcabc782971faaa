"""LR schedules against the reference run's per-epoch rates, and the authors' decay groups."""

from __future__ import annotations

import json

import pytest

from system.model import build_clustercam
from system.optim import OptimConfig, learning_rate, param_groups
from tests.golden import GOLDEN_A


@pytest.mark.parametrize("recipe, epochs", [("voc_run_e2e", 80), ("coco_run_e2e_coco", 60)])
def test_authors_schedule_reproduces_the_reference(recipe, epochs):
    ref = json.loads((GOLDEN_A.parent / "lr_schedule.json").read_text())[recipe]
    cfg = OptimConfig(lr_schedule="authors")
    steps_per_epoch = 7
    got = [learning_rate(cfg, ref["batch_size"], epochs, steps_per_epoch, e * steps_per_epoch + 3) for e in range(epochs)]
    assert got == pytest.approx(ref["lr_used_during_epoch"], rel=1e-12, abs=0)
    assert OptimConfig().lr_per_512 * ref["batch_size"] / 512 == pytest.approx(ref["base_lr"], rel=1e-12)


def test_scaled_schedule_warms_up_then_decays():
    cfg = OptimConfig(lr_schedule="scaled", lr_per_512=5e-4, warmup_epochs=1, warmup_lr=0.0)
    lrs = [learning_rate(cfg, 512, 4, 10, s) for s in range(40)]
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(5e-4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] > learning_rate(cfg, 512, 4, 10, 40) == pytest.approx(5e-6)


def test_decay_groups_match_the_reference_counts():
    groups = param_groups(build_clustercam(num_classes=20), 0.05)
    assert (len(groups[0]["params"]), len(groups[1]["params"])) == (91, 220)  # spec b.9
