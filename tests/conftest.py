"""Shared fixtures: a real S3 server (SeaweedFS) and a real local Ray cluster, both on loopback.

- ``s3_server`` (session): a running ``weed mini`` that requires signed requests. While it runs, the
  process environment carries its ``AWS_ENDPOINT_URL``/``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  so ``system.storage`` and any boto3 client find it with no extra arguments. ``s3_server.client()``
  is a boto3 client for set-up code; ``s3_server.env()`` the variables.
- ``s3_bucket`` (session): the name of a bucket created on it.
- ``s3_root`` (function): a fresh ``s3://<bucket>/<test-name>-<random>`` prefix for one test.
- ``ray_cluster`` (session): ``ray.init`` with 2 CPUs on 127.0.0.2, its own temp dir and auth token,
  started after ``s3_server`` so its workers inherit the S3 settings; shut down at the end.

Tiers: a test that needs a Ray cluster, a local stack or a whole entry point is marked ``slow``
(explicitly, or here by the fixtures it uses), so ``make test-fast`` (``-m "not slow"``) runs the unit
tests alone and ``make test`` runs everything.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from pipelines.stack import S3Server, start_s3

TEST_BUCKET = "clustercam-test"
_SLOW_FIXTURES = {"ray_cluster", "ray_head", "two_node_cluster", "started", "running", "demo"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    server = start_s3(tmp_path_factory.mktemp("seaweedfs"), buckets=(TEST_BUCKET,))
    try:
        with pytest.MonkeyPatch.context() as env:
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                env.delenv(key, raising=False)
            for key, value in server.env().items():
                env.setenv(key, value)
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    return TEST_BUCKET


@pytest.fixture
def s3_root(s3_bucket, request) -> str:
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name)[:40].strip("-")
    return f"s3://{s3_bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="ccr-", dir="/tmp")
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        context = ray.init(
            num_cpus=2,
            object_store_memory=256 * 2**20,
            include_dashboard=False,
            _node_ip_address="127.0.0.2",
            _temp_dir=temp_dir,
            configure_logging=False,
            log_to_driver=False,
        )
        try:
            yield context
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
