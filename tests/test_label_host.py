"""The host pool: worker processes give the same masks and lines as threads, sized from the actor's CPUs, bounded."""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from system import storage
from system.label.config import LabelConfig
from system.label.hostpool import host_pool, host_workers
from system.label.infer import Labeller
from system.label.inputs import Sample
from system.label.outputs import OutputWriter
from system.rejects import Reject
from tests.test_label import NAMES, run_all, sample, tiny_model


def _rotated_jpeg() -> bytes:
    """A 96x64 JPEG whose EXIF says 'rotate 90': decoding turns it upright before the model sees it."""
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :40] = (200, 30, 30)
    pixels[20:50, 50:90] = (20, 200, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def _inputs() -> list[Sample]:
    return [
        *(sample(i) for i in range(3)),
        sample(3, size=96),  # above max_side: resized for the model, the mask resized back
        Sample("rotated", "rotated", (1,), _rotated_jpeg(), None, "test"),
        Sample("bad", "bad", (0,), b"\xff\xd8 not a jpeg", None, "test"),
    ]


def _label_and_write(cfg: LabelConfig, output: str) -> tuple[list, list[dict], dict[str, bytes]]:
    cfg.output = output
    labeller = Labeller(tiny_model(), cfg, NAMES)
    pool = host_pool(cfg)
    try:
        writer = OutputWriter(cfg, NAMES, "run1", "a0", "model", pool)
        writer.begin_unit()
        out = []
        for item in labeller.label(_inputs(), pool):
            writer.submit(item)
            writer.collect()
            out.append(item)
        assert writer.close() == []
    finally:
        pool.shutdown()
    # PIL names the in-memory file it could not read by its address, which differs from run to run
    files = {
        uri[len(output) :]: re.sub(rb" at 0x[0-9a-f]+", b"", storage.get_bytes(uri))
        for uri in storage.list_uris(output)
    }
    return out, writer.unit_lines, files


def test_worker_processes_write_masks_and_lines_bit_identical_to_in_process_threads(tmp_path):
    common = dict(model="m", data="d", mode="both", precision="fp32", batch_size=2, scales=[1.0], max_side=64)
    threads = LabelConfig(output="o", host_workers=0, **common)
    processes = LabelConfig(output="o", host_workers=2, **common)
    out_t, lines_t, files_t = _label_and_write(threads, str(tmp_path / "threads"))
    out_p, lines_p, files_p = _label_and_write(processes, str(tmp_path / "processes"))
    assert len([name for name in files_t if name.endswith(".png")]) == 2 * 5, "five images, a seg and a cam mask each"
    assert files_p == files_t, "masks, stats parts and failure parts byte for byte"
    assert lines_p == lines_t
    assert [o.code for o in out_p if isinstance(o, Reject)] == ["corrupt"]
    masks_t = {o.sample.key: o.masks for o in out_t if not isinstance(o, Reject)}
    rotated = masks_t["rotated"]["seg"]
    assert rotated.shape == (96, 64), "the EXIF rotation was applied before the model"
    for o in out_p:
        if not isinstance(o, Reject):
            for mode, mask in o.masks.items():
                np.testing.assert_array_equal(mask, masks_t[o.sample.key][mode])


def test_the_same_labeller_gives_the_same_masks_through_a_process_pool_as_through_threads():
    cfg = LabelConfig(model="m", data="d", output="o", precision="fp32", batch_size=2, scales=[1.0], host_workers=1)
    lab = Labeller(tiny_model(), cfg, NAMES)
    pool = host_pool(cfg)
    try:
        via_process = list(lab.label(_inputs(), pool))
    finally:
        pool.shutdown()
    via_threads = run_all(lab, _inputs())
    assert [type(o).__name__ for o in via_process] == [type(o).__name__ for o in via_threads]
    for a, b in zip(via_process, via_threads):
        if not isinstance(a, Reject):
            np.testing.assert_array_equal(a.masks["seg"], b.masks["seg"])
            np.testing.assert_array_equal(a.pixels, b.pixels)


def test_host_workers_default_to_the_reserved_cpus_but_one_and_zero_means_threads():
    def cfg(**kw):
        return LabelConfig(model="m", data="d", output="o", **kw)

    assert host_workers(cfg(cpus_per_actor=0.5)) == 0
    assert host_workers(cfg(cpus_per_actor=1)) == 0
    assert host_workers(cfg(cpus_per_actor=8)) == 7
    assert host_workers(cfg(cpus_per_actor=8, host_workers=0)) == 0
    assert host_workers(cfg(cpus_per_actor=0.5, host_workers=3)) == 3
    assert isinstance(host_pool(cfg(cpus_per_actor=0.5)), ThreadPoolExecutor)
    with pytest.raises(ValueError, match="host_workers"):
        cfg(host_workers=-2)


def test_the_writer_holds_at_most_its_window_of_writes_in_flight(tmp_path, monkeypatch):
    cfg = LabelConfig(model="m", data="d", output=str(tmp_path / "job"), precision="fp32", scales=[1.0])
    results = run_all(Labeller(tiny_model(), cfg, NAMES), [sample(i) for i in range(4)])
    release, real_put = threading.Event(), storage.put_bytes

    def slow_put(uri, data):
        release.wait(30)
        real_put(uri, data)

    monkeypatch.setattr(storage, "put_bytes", slow_put)
    with ThreadPoolExecutor(1) as pool:
        writer = OutputWriter(cfg, NAMES, "run1", "a0", "model", pool, max_pending=2)
        writer.begin_unit()
        feeder = threading.Thread(target=lambda: [writer.submit(r) for r in results])
        feeder.start()
        time.sleep(0.5)
        assert feeder.is_alive() and len(writer.pending) == 2, "the third image waits for the oldest write"
        release.set()
        feeder.join(30)
        assert writer.close() == [] and writer.written == 4
