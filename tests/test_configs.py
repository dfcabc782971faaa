"""Every shipped config parses into its typed config (a typo in a key fails here, not on a cluster)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipelines.ingest import IngestConfig
from system.config import load_config
from system.label.config import LabelConfig
from system.label.infer import Labeller
from system.model import build_clustercam, export_model, load_clustercam
from system.training import TrainConfig

TRAIN_CONFIGS = ["voc.yaml", "coco.yaml", "openimages.yaml", "tiny.yaml"]


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_train_configs_parse(name, tmp_path):
    cfg = load_config(TrainConfig, Path("configs") / name, ["data=s3://b/d", "output=s3://b"])
    assert cfg.model.num_classes >= 1 and cfg.global_batch >= 1


def test_openimages_recipe_is_600_classes_with_partial_labels_on_32_gpus(tmp_path):
    cfg = load_config(TrainConfig, Path("configs") / "openimages.yaml", ["data=d", "output=o"])
    assert (cfg.model.num_classes, cfg.schedule.unknown_labels, cfg.num_workers, cfg.global_batch) == (
        600,
        "ignore",
        32,
        512,
    )
    assert cfg.model.head == "scalable"
    ingest = load_config(IngestConfig, "configs/openimages-ingest.yaml", ["output=o", "source.path=/data/oi"])
    assert ingest.source.classes == ["@class-descriptions-boxable.csv"] and ingest.source.hierarchy


def test_paper_recipes():
    voc = load_config(TrainConfig, "configs/voc.yaml", ["data=d", "output=o"])
    assert (voc.global_batch, voc.schedule.epochs, voc.schedule.seg_start_epoch, voc.stream.image_size) == (
        9,
        80,
        50,
        448,
    )
    assert (voc.schedule.bg_threshold, voc.schedule.ignore_delta, voc.optim.lr_schedule) == (0.40, 0.10, "authors")
    coco = load_config(TrainConfig, "configs/coco.yaml", ["data=d", "output=o"])
    assert (coco.global_batch, coco.schedule.epochs, coco.schedule.seg_start_epoch, coco.model.num_classes) == (
        6,
        60,
        40,
        80,
    )
    assert coco.schedule.bg_threshold == 0.43


def test_offload_needs_a_zero_stage_that_partitions():
    base = ["data=d", "output=o"]
    with pytest.raises(ValueError, match="deepspeed.offload_optimizer needs zero_stage 1, 2 or 3"):
        load_config(TrainConfig, "configs/tiny.yaml", base + ["deepspeed.offload_optimizer=true"])
    with pytest.raises(ValueError, match="deepspeed.offload_params needs zero_stage 3, got 2"):
        load_config(TrainConfig, "configs/tiny.yaml", base + ["deepspeed.offload_params=true", "zero_stage=2"])
    cfg = load_config(
        TrainConfig,
        "configs/voc.yaml",
        base
        + [
            "model.embed_dim=1024",
            "model.depth=24",
            "model.num_heads=16",
            "zero_stage=3",
            "deepspeed.offload_optimizer=true",
        ],
    )
    assert (cfg.zero_stage, cfg.model.embed_dim, cfg.deepspeed.offload_optimizer) == (3, 1024, True)


def test_cam_layers_must_fit_the_model():
    with pytest.raises(ValueError, match=r"schedule.cam_layers must be 1..model.depth \(3\), got 4"):
        load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o", "schedule.cam_layers=4"])


def test_labelling_makes_cams_as_the_model_was_trained(tmp_path):
    """tiny.yaml trains without p2p refinement; its exported model says so and labelling follows it."""
    assert load_config(TrainConfig, "configs/tiny.yaml", ["data=d", "output=o"]).schedule.cam_p2p_refine is False
    assert load_config(TrainConfig, "configs/voc.yaml", ["data=d", "output=o"]).schedule.cam_p2p_refine is True
    small = {"num_classes": 2, "embed_dim": 24, "depth": 2, "num_heads": 2, "img_size": 32, "decoder_channels": 8}
    export_model(
        build_clustercam(**small),
        str(tmp_path / "m"),
        class_names=["a", "b"],
        extra={"cam": {"layers": 2, "p2p_refine": False}},
    )
    trained = load_clustercam(str(tmp_path / "m"))
    cfg = load_config(LabelConfig, "configs/label-tiny.yaml", ["model=m", "data=d", "output=o"])
    labeller = Labeller(trained, cfg, ["a", "b"])
    assert (labeller.cam_layers, labeller.cam_p2p_refine) == (2, False)
    assert Labeller(trained, dataclasses.replace(cfg, cam_p2p_refine=True), ["a", "b"]).cam_p2p_refine is True
    unknown = Labeller(build_clustercam(**small), cfg, ["a", "b"])  # an authors' checkpoint: the paper's CAM
    assert (unknown.cam_layers, unknown.cam_p2p_refine) == (3, True)
