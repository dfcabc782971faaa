"""One URI interface over S3 (boto3) and the local file system.

Every job takes its inputs and outputs as URIs so the same code runs against a laptop directory, the
embedded SeaweedFS server and a cloud bucket. ``s3://bucket/key`` goes through boto3; anything else
(a path, or ``file://path``) is the local file system.

Endpoint and credentials come only from boto3's standard chain (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` ...): nothing here logs, stores or
formats them into messages. Credentials never travel with a job: every node (and so every Ray worker,
which inherits the raylet's environment) finds its own, and only ``aws_settings()`` (endpoint,
region, retry mode) may be handed to remote workers. Transient errors are retried by botocore
(standard mode unless ``AWS_RETRY_MODE`` says otherwise); what outlasts those retries is marked
``transient`` so the callers that own a unit of work can retry the whole unit later.

Atomic writes: a local write goes to a temporary file in the target folder and is renamed over the
final name. An S3 PUT (single or multipart) is already atomic - the object becomes visible complete
or not at all - so a temporary key plus copy would only double the traffic and leave debris behind.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import queue
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import boto3
import botocore.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

# settings a job may carry to its workers: none of them is a secret
_AWS_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CA_BUNDLE",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
)
# what selects this process's credentials: part of a client's identity, never handed on
_AWS_IDENTITY = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
_TRANSFER = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)
_clients: dict[tuple, object] = {}
_sessions: dict[tuple, boto3.session.Session] = {}
_clients_lock = threading.Lock()


class StorageError(RuntimeError):
    """A storage location cannot be used; the message names the URI and the reason.

    ``transient`` marks a fault that may pass (the endpoint unreachable, a reset, a 5xx): re-running
    the same work later can succeed, so it must not be recorded as a property of the input."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(error.get("Code", "")) in _TRANSIENT_CODES or int(status) >= 500
    if isinstance(
        exc,
        (
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.ConnectionError,
            botocore.exceptions.IncompleteReadError,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
        ),
    ):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a network fault or a server-side error that may pass."""
    seen = 0
    while exc is not None and seen < 16:
        if _transient_one(exc):
            return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        seen += 1
    return False


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def _local(uri: str) -> Path:
    uri = str(uri)
    return Path(urlparse(uri).path if uri.startswith("file://") else uri)


def aws_settings() -> dict[str, str]:
    """The non-secret AWS settings of this process (endpoint, region, retries), for a job's workers.

    Credentials are deliberately absent: a ``runtime_env`` is logged by Ray's runtime-env agent and
    shown by the dashboard, so workers read theirs from their own node's environment."""
    return {k: os.environ[k] for k in _AWS_SETTINGS if k in os.environ}


def _client(fast_fail: bool = False):
    """A boto3 client per process and AWS setting. Clients are per pid (their connection pools must
    not cross a fork); sessions are shared, so a forked DataLoader or Ray worker reuses the parsed
    service models instead of loading them again."""
    env = tuple(sorted((k, os.environ[k]) for k in _AWS_SETTINGS + _AWS_IDENTITY if k in os.environ))
    key = (os.getpid(), fast_fail, env)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            session = _sessions.get(env)
            if session is None:
                session = _sessions[env] = boto3.session.Session()
            retries = (
                {"mode": "standard", "max_attempts": 2}
                if fast_fail
                else {
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                    "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
                }
            )
            config = Config(
                retries=retries,
                connect_timeout=5 if fast_fail else 20,
                read_timeout=10 if fast_fail else 120,
                max_pool_connections=32,
                s3={"addressing_style": "path"},
            )
            client = session.client("s3", config=config)
            _clients[key] = client
        return client


def _after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _explain(uri: str, exc: Exception) -> StorageError:
    """Turn a botocore failure into a message a person can act on, without any secret in it."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StorageError(
            f"{uri}: no AWS credentials found on host {socket.gethostname()} (set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE in every node's environment, or give the node an "
            "identity: a Kubernetes Secret, IRSA or an instance profile)"
        )
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint ({type(exc).__name__}); check AWS_ENDPOINT_URL", transient=True
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and status == 404):
            return StorageError(f"{uri}: bucket or object does not exist ({code})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StorageError(f"{uri}: credentials refused by the S3 endpoint ({code})")
        return StorageError(f"{uri}: S3 error {code or status}", transient=_transient_one(exc))
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}", transient=is_transient(exc))


def _is_not_found(exc: Exception) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")
    return False


def join(uri: str, *parts: str) -> str:
    out = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out.rstrip("/") + "/" + part if out else part
    return out


def get_bytes(uri: str) -> bytes:
    """Whole object; a missing object is FileNotFoundError so callers can treat both back ends alike."""
    if not is_s3(uri):
        return _local(uri).read_bytes()
    bucket, key = _split_s3(uri)
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(uri) from None
        raise _explain(uri, exc) from exc


def _local_temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def _local_atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` that replaces it only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _local_temp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Pipe:
    """Bytes handed from a writer to boto3's upload thread, so a shard uploads while it is built.

    The reader side is what ``upload_fileobj`` consumes. An exception put into the pipe is raised
    in the reader, which makes s3transfer abort the (multipart) upload: a failed write leaves no
    object, never a truncated one.
    """

    _CHUNK = 1 << 20

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._pending = bytearray()
        self._buffer = bytearray()
        self._eof = False
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size is None or size < 0 or len(self._buffer) < size):
            item = self._queue.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self._buffer += item
        n = len(self._buffer) if size is None or size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def readable(self) -> bool:
        return True

    def put(self, item, alive) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not alive():
                    return

    def write(self, data: bytes, alive) -> int:
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= self._CHUNK:
            self.flush(alive)
        return len(data)

    def flush(self, alive) -> None:
        self.put(bytes(self._pending), alive)
        self._pending.clear()


class _S3Writer:
    def __init__(self, uri: str):
        bucket, key = _split_s3(uri)
        self.uri, self.pipe, self.error = uri, _Pipe(), None
        client = _client()

        def upload():
            try:
                client.upload_fileobj(self.pipe, bucket, key, Config=_TRANSFER)
            except BaseException as exc:  # handed to the writer thread
                self.error = exc

        self.thread = threading.Thread(target=upload, name=f"upload {key}", daemon=True)
        self.thread.start()

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self._failure()
        return self.pipe.write(data, self.thread.is_alive)

    def tell(self) -> int:
        return self.pipe.size

    def _failure(self) -> Exception:
        if isinstance(self.error, botocore.exceptions.ClientError):
            return _explain(self.uri, self.error)
        return StorageError(
            f"{self.uri}: upload failed ({type(self.error).__name__}: {self.error})", transient=is_transient(self.error)
        )

    def finish(self) -> None:
        self.pipe.flush(self.thread.is_alive)
        self.pipe.put(None, self.thread.is_alive)
        self.thread.join()
        if self.error is not None:
            raise self._failure()

    def abort(self, exc: BaseException) -> None:
        self.pipe.put(exc, self.thread.is_alive)
        self.thread.join()


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """Write big outputs (shards) as a stream: S3 uploads while the data is produced, nothing is
    held in memory or on local disk, and nothing appears if the block fails."""
    if not is_s3(uri):
        with _local_atomic(_local(uri)) as tmp, open(tmp, "wb") as f:
            yield f
        return
    writer = _S3Writer(uri)
    try:
        yield writer
    except BaseException as exc:
        writer.abort(exc)
        raise
    writer.finish()


def put_bytes(uri: str, data: bytes) -> None:
    if not is_s3(uri):
        with _local_atomic(_local(uri)) as tmp:
            tmp.write_bytes(data)
        return
    bucket, key = _split_s3(uri)
    try:
        _client().put_object(Bucket=bucket, Key=key, Body=data)
    except botocore.exceptions.ClientError as exc:
        raise _explain(uri, exc) from exc


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = _split_s3(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as exc:
        if _is_not_found(exc):
            return False
        raise _explain(uri, exc) from exc


def list_uris(prefix_uri: str) -> list[str]:
    """Every object below a folder-like prefix (``a/b`` lists ``a/b/...``, not ``a/bc``), sorted."""
    return sorted(iter_uris(prefix_uri))


def iter_uris(prefix_uri: str) -> Iterator[str]:
    """``list_uris`` as a stream, for folders too big to hold: S3 returns keys in order a page (1000
    keys) at a time, and only the current page is held; a local folder is listed whole, sorted."""
    if not is_s3(prefix_uri):
        root = _local(prefix_uri)
        if not root.is_dir():
            return
        base = str(prefix_uri).rstrip("/")
        yield from sorted(join(base, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())
        return
    bucket, prefix = _split_s3(prefix_uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    try:
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from (f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    except botocore.exceptions.ClientError as exc:
        raise _explain(prefix_uri, exc) from exc


def delete(uri: str) -> None:
    """Remove one object; one that is already gone is not an error."""
    if not is_s3(uri):
        _local(uri).unlink(missing_ok=True)
        return
    bucket, key = _split_s3(uri)
    try:
        _client().delete_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        raise _explain(uri, exc) from exc


class _S3Raw(io.RawIOBase):
    """botocore's streaming body as a raw file; ``open_read`` buffers it, because each small read
    straight from the body costs a trip through urllib3 (tar parsing reads 512-byte headers)."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def open_read(uri: str) -> BinaryIO:
    if not is_s3(uri):
        return open(_local(uri), "rb")
    bucket, key = _split_s3(uri)
    try:
        return io.BufferedReader(_S3Raw(_client().get_object(Bucket=bucket, Key=key)["Body"]), buffer_size=1 << 20)
    except botocore.exceptions.ClientError as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(uri) from None
        raise _explain(uri, exc) from exc


def upload_file(local_path: str | Path, uri: str) -> None:
    if not is_s3(uri):
        with _local_atomic(_local(uri)) as tmp:
            shutil.copyfile(local_path, tmp)
        return
    bucket, key = _split_s3(uri)
    try:
        _client().upload_file(str(local_path), bucket, key, Config=_TRANSFER)
    except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError) as exc:
        raise _explain(uri, exc) from exc


def download_file(uri: str, local_path: str | Path) -> None:
    with _local_atomic(Path(local_path)) as tmp:
        if not is_s3(uri):
            shutil.copyfile(_local(uri), tmp)
            return
        bucket, key = _split_s3(uri)
        try:
            _client().download_file(bucket, key, str(tmp), Config=_TRANSFER)
        except botocore.exceptions.ClientError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(uri) from None
            raise _explain(uri, exc) from exc


def _check_bucket(uri: str) -> tuple[str, str]:
    bucket, key = _split_s3(uri)
    try:
        _client(fast_fail=True).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
        raise _explain(uri, exc) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise _explain(uri, exc) from None
    return bucket, key


def check_readable(uri: str) -> None:
    """Fail before any work starts if ``uri`` (an object or a prefix) cannot be read."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.exists():
            raise StorageError(f"{uri}: does not exist")
        if not os.access(path, os.R_OK):
            raise StorageError(f"{uri}: not readable")
        return
    bucket, key = _check_bucket(uri)
    try:
        _client(fast_fail=True).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise _explain(uri, exc) from None


def check_writable(uri: str) -> None:
    """Fail before any work starts if nothing can be written below ``uri``; leaves nothing behind."""
    if not is_s3(uri):
        path = _local(uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise StorageError(f"{uri}: not writable ({exc.strerror or exc})") from None
        return
    bucket, key = _check_bucket(uri)
    probe = join(key, f".write-probe-{uuid.uuid4().hex}")
    client = _client(fast_fail=True)
    try:
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise _explain(uri, exc) from None
