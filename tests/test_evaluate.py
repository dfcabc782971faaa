"""pipelines.evaluate: any mask folder against a dataset's GT, equal to the metric computed directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.evaluate import EvaluateConfig, evaluate
from system.masks import encode_mask, pascal_palette
from system.metrics import ConfusionMatrix
from tests.test_label import K, synthetic_sample, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _dataset_and_masks(tmp_path):
    samples = [synthetic_sample(i) for i in range(6)]
    write_dataset(str(tmp_path / "ds"), [s[:2] for s in samples], shard_size=4)
    rng = np.random.default_rng(0)
    (tmp_path / "masks").mkdir()
    pairs = []
    for n, (key, _, gt, _) in enumerate(samples[:-1]):
        pred = np.where(rng.random(gt.shape) < 0.2, rng.integers(0, K + 1, gt.shape), gt).astype(np.uint8)
        pred[:2] = 255
        if n == 0:  # a PASCAL-coloured RGB mask, as some tools save them
            rgb = np.array(pascal_palette(), dtype=np.uint8).reshape(256, 3)[pred]
            Image.fromarray(rgb).save(tmp_path / "masks" / f"{key}.png")
        else:
            (tmp_path / "masks" / f"{key}.png").write_bytes(encode_mask(pred))
        pairs.append((gt, pred))
    return samples, pairs


def test_evaluate_equals_direct_confusion_and_scores_missing_masks(tmp_path):
    samples, pairs = _dataset_and_masks(tmp_path)
    direct = ConfusionMatrix(K + 1)
    for gt, pred in pairs:
        direct.add(gt, pred)
    partial = evaluate(EvaluateConfig(masks=str(tmp_path / "masks"), data=str(tmp_path / "ds"), missing_as_wrong=False))
    assert partial["miou"] == pytest.approx(direct.miou(), abs=1e-12) and partial["images"] == 5
    assert partial["missing_masks"] == 1
    missing_gt = samples[-1][2]
    direct.add(missing_gt, np.full_like(missing_gt, 255))
    full = evaluate(EvaluateConfig(masks=str(tmp_path / "masks"), data=str(tmp_path / "ds")))
    assert full["miou"] == pytest.approx(direct.miou(), abs=1e-12) and full["images"] == 6
    assert full["miou"] < partial["miou"]
    assert set(full["iou"]) == {"background", *json.loads((tmp_path / "ds" / "dataset.json").read_text())["classes"]}


def test_evaluate_cli_writes_json_and_rejects_wrong_sizes(tmp_path):
    samples, _ = _dataset_and_masks(tmp_path)
    out = tmp_path / "eval.json"
    args = [f"masks={tmp_path / 'masks'}", f"data={tmp_path / 'ds'}", f"output={out}"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.evaluate", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["miou"] == pytest.approx(json.loads(proc.stdout)["miou"])
    key = samples[1][0]
    (tmp_path / "masks" / f"{key}.png").write_bytes(encode_mask(np.zeros((5, 7), np.uint8)))
    with pytest.raises(ValueError, match=f"{key}.png is 7x5"):
        evaluate(EvaluateConfig(masks=str(tmp_path / "masks"), data=str(tmp_path / "ds")))
