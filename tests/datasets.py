"""Small synthetic datasets written straight through the ingest library (no Ray), for tests."""

from __future__ import annotations

from system.data import ingest
from system.data.shards import DatasetInfo
from system.data.sources import SourceConfig, build_source


def build_synthetic(
    uri: str, num_images: int, num_classes: int = 4, image_size: int = 48, shard_size: int = 4, seed: int = 3
) -> DatasetInfo:
    """Ingest synthetic scenes into ``uri`` in-process; returns its ``dataset.json``."""
    source = build_source(
        SourceConfig(
            format="synthetic", num_images=num_images, num_classes=num_classes, image_size=image_size, seed=seed
        )
    )
    work = ingest.plan(source, shard_size)
    parts = [
        ingest.write_shard(source, ingest.ShardTask(i, g, uri, source.class_names, "t"))
        for i, g in enumerate(work.groups)
    ]
    return ingest.finalize(uri, "t", source.class_names, parts, work.rejects, work.inputs, {})
