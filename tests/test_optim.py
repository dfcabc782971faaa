"""LR schedules against the reference run's per-epoch rates, and the authors' decay groups."""

from __future__ import annotations

import json

import pytest
import torch

from system.model import build_clustercam
from system.optim import OptimConfig, learning_rate, param_groups, set_step_hyperparams
from tests.golden import LR_SCHEDULE


@pytest.mark.parametrize("recipe, epochs", [("voc_run_e2e", 80), ("coco_run_e2e_coco", 60)])
def test_authors_schedule_reproduces_the_reference(recipe, epochs):
    ref = json.loads(LR_SCHEDULE.read_text())[recipe]
    cfg = OptimConfig(lr_schedule="authors")
    steps_per_epoch = 7
    got = [
        learning_rate(cfg, ref["batch_size"], epochs, steps_per_epoch, e * steps_per_epoch + 3) for e in range(epochs)
    ]
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
    decayed = sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)
    plain = sum(len(g["params"]) for g in groups if g["weight_decay"] == 0)
    assert (decayed, plain) == (91, 220)  # docs/method.md §b.9


def test_decoder_weight_decay_waits_for_the_segmentation_phase():
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=64, decoder_channels=8)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=0.1)
    set_step_hyperparams(opt, 1e-3, seg_phase=False)
    decoder = next(g for g in opt.param_groups if g["name"] == "decoder")
    assert decoder["weight_decay"] == 0.0 and all(g["lr"] == 1e-3 for g in opt.param_groups)
    before = model.decoder.conv6.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # what a ZeRO flat partition feeds AdamW for an unused module
    opt.step()
    assert torch.equal(model.decoder.conv6.weight, before)
    set_step_hyperparams(opt, 1e-3, seg_phase=True)
    assert decoder["weight_decay"] == 0.05
