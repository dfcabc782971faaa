"""benchmarks/quality.py's one-process mode (the recipe search), end to end on a few scenes."""

from __future__ import annotations

import json

from benchmarks import quality


def test_one_process_mode_trains_once_per_seed_and_labels_each_variant(tmp_path):
    out = tmp_path / "q.json"
    quality.main(
        [
            "--one-process",
            "--seeds",
            "0",
            "--variants",
            "clustercam,clustercam-p2p",
            "--json",
            str(out),
            f"dir={tmp_path}",
            "train_images=32",
            "heldout_images=8",
            "train=[schedule.epochs=2,schedule.seg_start_epoch=1]",
        ]
    )
    result = json.loads(out.read_text())
    assert result["mode"] == "one-process"
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"clustercam", "clustercam-p2p"}
    assert runs["clustercam"]["train_s"] > 0
    # the p2p variant labels the clustercam model again: no training, the same segmentation masks
    assert runs["clustercam-p2p"]["train_s"] is None
    assert runs["clustercam-p2p"]["seg_miou"] == runs["clustercam"]["seg_miou"]
    assert runs["clustercam-p2p"]["cam_miou"] != runs["clustercam"]["cam_miou"]
    assert 0 < result["baseline_all_background_miou"] < 1
    assert all(0 <= r[k] <= 1 for r in runs.values() for k in ("seg_miou", "cam_miou"))
    assert set(runs["clustercam"]["seg_iou"]) == {
        "background",
        *json.loads((tmp_path / "one-process/heldout/dataset.json").read_text())["classes"],
    }


def test_one_process_mode_refuses_a_misspelt_key_before_it_ingests(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        quality.main(["--one-process", f"dir={tmp_path}", 'train=["stream.crop_scal=[0.5,1.0]"]'])
    assert exit_.value.code == 2
    assert "stream.crop_scal" in capsys.readouterr().err
    assert not (tmp_path / "one-process").exists()
