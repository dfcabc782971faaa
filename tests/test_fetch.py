"""http(s) images of a manifest: fetched with retries and bounds, refused when unsafe, against a real local server."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from system.data.fetch import FetchConfig, FetchError, check_address, fetch

IMAGE = Image.fromarray(np.full((12, 16, 3), (200, 40, 90), np.uint8))


def _jpeg() -> bytes:
    out = io.BytesIO()
    IMAGE.save(out, format="JPEG", quality=95)
    return out.getvalue()


JPEG = _jpeg()


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    active: Counter = Counter()
    most_active = 0
    lock = threading.Lock()

    def log_message(self, *args):  # the tests' output stays readable
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path
        cls = type(self)
        counted = "slowish" in path  # concurrency of the per-host test's requests only
        with cls.lock:
            cls.hits[path] += 1
            hits = cls.hits[path]
            cls.active["slowish"] += counted
            cls.most_active = max(cls.most_active, cls.active["slowish"])
        try:
            self._answer(path, hits)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (the timeout test)
        finally:
            with cls.lock:
                cls.active["slowish"] -= counted

    def _answer(self, path: str, hits: int) -> None:
        if path.startswith("/img"):
            time.sleep(0.05 if "slowish" in path else 0)
            self._send(200, JPEG, {"Content-Type": "image/jpeg"})
        elif path == "/missing.jpg":
            self._send(404, b"not here")
        elif path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, JPEG)
        elif path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            self._send(302, headers={"Location": f"/hop/{left - 1}" if left > 0 else "/img.jpg"})
        elif path == "/big.jpg":
            self._send(200, b"\xff" * 5000)
        elif path == "/big-unannounced.jpg":  # no Content-Length: the size is found while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"\xff" * 5000)
            self.close_connection = True
        elif path == "/flaky.jpg":
            if hits < 3:
                self._send(503 if hits == 1 else 429, b"busy", {"Retry-After": "0"})
            else:
                self._send(200, JPEG)
        elif path == "/down.jpg":
            self._send(500, b"broken")
        elif path == "/to-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif path == "/to-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


LOCAL = FetchConfig(allow_private=True, timeout_s=0.5, attempts=2, backoff_s=0.01, max_bytes=4000)


def _refused(url: str, cfg: FetchConfig = LOCAL) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, cfg)
    return info.value


def test_an_image_url_is_fetched_byte_for_byte(server):
    assert fetch(f"{server}/img.jpg", LOCAL) == JPEG


def test_a_missing_image_is_an_http_404_naming_the_url(server):
    error = _refused(f"{server}/missing.jpg")
    assert error.code == "http_404" and f"{server}/missing.jpg: HTTP 404" in str(error)
    assert _Handler.hits["/missing.jpg"] == 1, "a 404 is final, not retried"


def test_a_server_that_does_not_answer_in_time_is_a_timeout_after_retries(server):
    start = time.monotonic()
    error = _refused(f"{server}/slow.jpg")
    assert error.code == "timeout" and "after 2 tries" in str(error)
    assert time.monotonic() - start < 1.5 * 2


def test_redirects_are_followed_up_to_the_limit(server):
    assert fetch(f"{server}/hop/3", LOCAL) == JPEG
    error = _refused(f"{server}/hop/9")
    assert error.code == "too_many_redirects" and "more than 5 redirects" in str(error)


def test_a_body_over_max_bytes_is_too_large_whether_announced_or_not(server):
    assert _refused(f"{server}/big.jpg").code == "too_large"
    error = _refused(f"{server}/big-unannounced.jpg")
    assert error.code == "too_large" and "4,000" in str(error)


def test_5xx_and_429_are_retried_honouring_retry_after(server):
    cfg = FetchConfig(allow_private=True, attempts=3, backoff_s=5.0)  # Retry-After 0 wins over the backoff
    start = time.monotonic()
    assert fetch(f"{server}/flaky.jpg", cfg) == JPEG
    assert _Handler.hits["/flaky.jpg"] == 3 and time.monotonic() - start < 2
    error = _refused(f"{server}/down.jpg")
    assert error.code == "http_500" and "HTTP 500" in str(error) and _Handler.hits["/down.jpg"] == 2


def test_a_closed_port_is_a_connection_failure_not_a_timeout():
    error = _refused("http://127.0.0.1:1/x.jpg")
    assert error.code == "connection_failed" and "after 2 tries" in str(error)


def test_private_addresses_are_refused_without_the_opt_in(server):
    before = _Handler.hits["/img.jpg"]
    error = _refused(f"{server}/img.jpg", FetchConfig())
    assert error.code == "refused_address" and "127.0.0.1" in str(error) and "allow_private" in str(error)
    assert _Handler.hits["/img.jpg"] == before, "refused before any connection"
    for address in ("10.1.2.3", "192.168.0.1", "::1", "::ffff:127.0.0.1", "100.64.0.1"):
        with pytest.raises(FetchError):
            check_address(address, allow_private=False)
    check_address("8.8.8.8", allow_private=False)


def test_metadata_addresses_and_other_schemes_are_refused_even_on_a_redirect(server):
    error = _refused(f"{server}/to-metadata")
    assert error.code == "refused_address" and "169.254.169.254" in str(error)
    assert _refused(f"{server}/to-file").code == "refused_scheme"
    assert _refused("ftp://127.0.0.1/x.jpg").code == "refused_scheme"


def test_requests_to_one_host_are_limited_per_host(server):
    from concurrent.futures import ThreadPoolExecutor

    _Handler.most_active = 0
    cfg = FetchConfig(allow_private=True, per_host=2)
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: fetch(f"{server}/img-slowish-{i}", cfg), range(16)))
    assert bodies == [JPEG] * 16 and _Handler.most_active == 2


def test_a_manifest_of_urls_ingests_with_unreachable_ones_as_rejects(server, s3_root, ray_cluster, tmp_path):
    from pipelines.ingest import IngestConfig, run
    from system import storage
    from system.data.sources import SourceConfig
    from tests import ingest_inputs as inputs

    rows = [
        {"id": "ok", "image": f"{server}/img.jpg", "labels": ["a"]},
        {"id": "gone", "image": f"{server}/missing.jpg", "labels": ["a"]},
        {"id": "hops", "image": f"{server}/hop/2", "labels": ["b"]},
        {"id": "loop", "image": f"{server}/hop/50", "labels": ["b"]},
    ]
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fetch_cfg = FetchConfig(allow_private=True, timeout_s=2, attempts=2, backoff_s=0.01)
    info = run(
        IngestConfig(
            output=s3_root,
            source=SourceConfig(format="manifest", path=str(manifest), fetch=fetch_cfg),
            shard_size=2,
            progress_every_s=0.0,
        )
    )
    samples = inputs.read_samples(s3_root)
    assert sorted(samples) == ["hops", "ok"] and samples["ok"]["jpg"] == JPEG
    assert json.loads(samples["ok"]["json"])["source"] == f"{server}/img.jpg"
    rejects = [json.loads(x) for x in storage.get_bytes(storage.join(s3_root, "rejects.jsonl")).splitlines()]
    assert {(r["id"], r["code"]) for r in rejects} == {("gone", "http_404"), ("loop", "too_many_redirects")}
    assert "HTTP 404" in next(r["reason"] for r in rejects if r["id"] == "gone")
    assert info.rejected.by_code == {"http_404": 1, "too_many_redirects": 1}
