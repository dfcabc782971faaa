"""Unit records, the quality report and ``select``: their numbers against a direct computation from the masks.

No Ray: the tiny model labels a few images, the real ``OutputWriter`` stores them on a local folder
unit by unit, and each unit's record is built the way the actor builds it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pipelines.select import SelectConfig, select
from system import storage
from system.label import records
from system.label.config import LabelConfig
from system.label.infer import Labeller, to_input
from system.label.inputs import plan_inputs
from system.label.outputs import JOB_FILE, OutputWriter, PlannedUnit, finalize_outputs
from system.label.records import AREA_EDGES, UnitRef, build_record, list_units, write_record
from system.metrics import ConfusionMatrix
from system.refine import IGNORE_INDEX
from tests.test_label import NAMES, K, run_all, sample, tiny_model

UNIT_SIZE = 2


@pytest.fixture(scope="module")
def both_job(tmp_path_factory):
    """Six images labelled with mode=both, stored in three units with their records."""
    out = str(tmp_path_factory.mktemp("records") / "job")
    cfg = LabelConfig(
        model="m", data="d", output=out, mode="both", precision="fp32", scales=[1.0], cam_scales=[1.0], flush_every=2
    )
    model = tiny_model()
    lab = Labeller(model, cfg, NAMES)
    samples = [sample(i) for i in range(6)]
    results = run_all(lab, samples)
    planned = []
    with ThreadPoolExecutor(2) as pool:
        writer = OutputWriter(cfg, NAMES, "run1", "a0", "tiny", pool)
        for u in range(0, len(results), UNIT_SIZE):
            writer.begin_unit()
            for r in results[u : u + UNIT_SIZE]:
                writer.submit(r)
            writer.close()
            ref = UnitRef(f"chunk-{u // UNIT_SIZE:06d}", "f" * 16)
            keys = [line["key"] for line in writer.unit_lines]
            record, rows = build_record(ref, "d", "run1", cfg.modes, NAMES, writer.unit_lines, keys, [], [], 0)
            write_record(out, ref, record, rows)
            planned.append(PlannedUnit(ref, UNIT_SIZE))
    job = {"config": {"mode": "both", "mask_format": "png"}, "dataset": {"kind": "manifest"}}
    storage.put_bytes(storage.join(out, JOB_FILE), json.dumps(job).encode())
    return cfg, lab, results, planned


def _bin(fraction: float) -> int:
    for i in range(len(AREA_EDGES) - 1):
        if AREA_EDGES[i] <= fraction < AREA_EDGES[i + 1]:
            return i
    return len(AREA_EDGES) - 2


def test_the_quality_report_equals_a_direct_computation_from_the_masks(both_job):
    cfg, lab, results, planned = both_job
    final = finalize_outputs(cfg, NAMES, planned)
    names = ["background", *NAMES]
    n = len(names)
    present, tagged, absent = np.zeros(n), np.zeros(n), np.zeros(n)
    area, hist = np.zeros(n), np.zeros((n, len(AREA_EDGES) - 1))
    conf_sum, conf_n = np.zeros(n), np.zeros(n)
    inter, union = np.zeros(n), np.zeros(n)
    cm = ConfusionMatrix(K + 1)
    for r in results:
        seg, cam = r.masks["seg"], r.masks["cam"]
        counts = np.bincount(seg.ravel(), minlength=256)[:n]
        for v in np.flatnonzero(counts):
            present[v] += 1
            area[v] += counts[v] / seg.size
            hist[v, _bin(counts[v] / seg.size)] += 1
        for k in r.sample.labels:
            tagged[k + 1] += 1
            absent[k + 1] += counts[k + 1] == 0
        tags = torch.zeros(1, K)
        tags[0, list(r.sample.labels)] = 1
        with torch.inference_mode():
            labels, conf = lab.seg(to_input(torch.from_numpy(r.pixels.copy()))[None], tags, [])
        for v in torch.unique(labels).tolist():
            conf_sum[v] += float(conf[labels == v].double().mean())
            conf_n[v] += 1
        valid = cam != IGNORE_INDEX
        for v in range(n):
            inter[v] += ((seg == v) & (cam == v) & valid).sum()
            union[v] += (((seg == v) | (cam == v)) & valid).sum()
        cm.add(r.gt, seg)
    quality = final["quality"]
    classes = quality["modes"]["seg"]["classes"]
    assert quality["modes"]["seg"]["images"] == len(results) and final["masks"] == len(results)
    for v, name in enumerate(names):
        c = classes[name]
        assert (c["images"], c["tagged"], c["absent_when_tagged"]) == (present[v], tagged[v], absent[v]), name
        assert c["area_histogram"] == hist[v].tolist(), name
        if present[v]:
            assert c["mean_area"] == pytest.approx(area[v] / present[v], abs=1e-5)
            assert c["mean_confidence"] == pytest.approx(conf_sum[v] / conf_n[v], abs=1e-4)
        if tagged[v]:
            assert c["absent_rate"] == pytest.approx(absent[v] / tagged[v])
        expected = inter[v] / union[v] if union[v] else None
        assert quality["agreement"]["iou"][name] == pytest.approx(expected, abs=1e-6)
    assert present.sum() > len(results) and union.sum() > 0, "the set has classes and agreement to check"
    assert final["eval"]["seg"]["miou"] == pytest.approx(cm.miou(), abs=1e-12)
    assert final["eval"]["seg"]["images"] == len(results) and final["missing"] == 0


def test_records_summed_in_ray_tasks_equal_the_sum_in_the_driver(both_job, ray_cluster, monkeypatch):
    cfg, _, _, planned = both_job
    alone = finalize_outputs(cfg, NAMES, planned)
    monkeypatch.setattr(records, "RECORDS_PER_TASK", 1)  # three records: three tasks
    tasks = finalize_outputs(cfg, NAMES, planned)
    assert tasks["quality"] == alone["quality"] and tasks["eval"] == alone["eval"]
    assert tasks["masks"] == alone["masks"] == len(planned) * UNIT_SIZE


def test_select_keeps_exactly_the_masks_that_pass_the_thresholds(both_job):
    cfg, _, results, _ = both_job
    values = {}
    for r in results:
        seg, cam = r.masks["seg"], r.masks["cam"]
        valid = cam != IGNORE_INDEX
        ious = [
            ((seg == v) & (cam == v) & valid).sum() / u
            for v in range(K + 1)
            if (u := (((seg == v) | (cam == v)) & valid).sum())
        ]
        fractions = np.bincount(seg.ravel(), minlength=K + 1) / seg.size
        smallest = min((fractions[k + 1] for k in r.sample.labels), default=1.0)
        values[r.sample.id] = (r.confidence["seg"], float(np.mean(ious)), smallest)
    confidences = sorted(v[0] for v in values.values())
    agreements = sorted(v[1] for v in values.values())
    # thresholds half-way between two images' values, so the rounding of stored values cannot matter
    thresholds = dict(
        min_confidence=(confidences[0] + confidences[1]) / 2,
        min_agreement=(agreements[0] + agreements[1]) / 2,
        min_area=0.01,
    )
    out = storage.join(cfg.output, "picked.jsonl")
    done = select(SelectConfig(job=cfg.output, output=out, **thresholds))
    rows = [json.loads(line) for line in storage.get_bytes(out).decode().splitlines()]
    expected = {
        i
        for i, (c, a, s) in values.items()
        if c >= thresholds["min_confidence"] and a >= thresholds["min_agreement"] and s >= 0.01
    }
    assert {row["id"] for row in rows} == expected and done.images == len(results) and done.selected == len(rows)
    assert 0 < len(expected) < len(results), "the thresholds must split the set"
    assert all(storage.exists(row["mask"]) and row["image"] == "test" for row in rows)


def test_a_record_name_carries_the_input_fingerprint_so_a_changed_input_is_redone(tmp_path):
    rows = [{"id": f"m{i}", "image": f"{i}.png", "labels": [NAMES[0]]} for i in range(5)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = [u.ref for u in plan_inputs(str(manifest), K, NAMES, chunk=2).units]
    rows[3]["labels"] = [NAMES[1]]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    after = [u.ref for u in plan_inputs(str(manifest), K, NAMES, chunk=2).units]
    assert [r.name for r in before] == [r.name for r in after] == ["chunk-000000", "chunk-000001", "chunk-000002"]
    assert [a == b for a, b in zip(before, after)] == [True, False, True]
    out = str(tmp_path / "job")
    for ref in before:
        storage.put_bytes(ref.record(out), b"{}")
    storage.put_bytes(before[1].marker(out), b"run")
    listing = list_units(out)
    assert [listing.done(ref) for ref in after] == [True, False, True]
    assert listing.was_started(before[1]) and not listing.was_started(after[1]), "a changed input starts afresh"


def test_a_manifest_is_planned_in_two_streaming_passes_and_a_repeated_id_is_a_reject(tmp_path):
    rows = [{"id": f"m{i % 4}", "image": f"{i}.png", "labels": []} for i in range(6)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_inputs(str(manifest), K, NAMES, chunk=3)
    assert plan.total == 6 and plan.unit_count == 2 and plan.rejects == []
    units = list(plan.units)
    assert [[e.id for e in u.entries] for u in units] == [["m0", "m1", "m2"], ["m3"]]
    assert [(r.key, r.code) for r in plan.rejects] == [("m0", "duplicate_id"), ("m1", "duplicate_id")]
    assert plan.rejects[0].reason.startswith("duplicate id (first at ") and plan.rejects[0].reason.endswith("/0.png)")
