"""Every shipped config parses into its typed config (a typo in a key fails here, not on a cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from system.config import load_config
from system.label.config import LabelConfig
from system.training import TrainConfig

TRAIN_CONFIGS = ["voc.yaml", "coco.yaml", "openimages.yaml", "tiny.yaml"]


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_train_configs_parse(name):
    cfg = load_config(TrainConfig, Path("configs") / name, ["data=s3://b/d", "output=s3://b"])
    assert cfg.model.num_classes >= 1 and cfg.global_batch >= 1


def test_paper_recipes():
    voc = load_config(TrainConfig, "configs/voc.yaml", ["data=d", "output=o"])
    assert (voc.global_batch, voc.schedule.epochs, voc.schedule.seg_start_epoch, voc.stream.image_size) == (9, 80, 50, 448)
    assert (voc.schedule.bg_threshold, voc.schedule.ignore_delta, voc.optim.lr_schedule) == (0.40, 0.10, "authors")
    coco = load_config(TrainConfig, "configs/coco.yaml", ["data=d", "output=o"])
    assert (coco.global_batch, coco.schedule.epochs, coco.schedule.seg_start_epoch, coco.model.num_classes) == (6, 60, 40, 80)
    assert coco.schedule.bg_threshold == 0.43


def test_cam_layers_must_fit_the_model():
    with pytest.raises(ValueError, match=r"schedule.cam_layers must be 1..model.depth \(12\), got 13"):
        load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o", "schedule.cam_layers=13"])


def test_tiny_recipe_makes_cams_without_p2p_refinement():
    """configs/tiny.yaml trains from scratch; its labelling config must make CAMs the same way."""
    tiny = load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o"])
    label = load_config(LabelConfig, "configs/label-tiny.yaml")
    assert tiny.schedule.cam_p2p_refine is False and label.cam_p2p_refine is False
    assert load_config(TrainConfig, "configs/voc.yaml", ["data=d", "output=o"]).schedule.cam_p2p_refine is True
