"""system.storage against the local file system and a real S3 server with credentials required."""

from __future__ import annotations

import os

import botocore.exceptions
import pytest

from system import storage
from system.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_put_get_exists_roundtrip(root):
    uri = storage.join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.put_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.get_bytes(uri) == b"hello"
    storage.put_bytes(uri, b"replaced")
    assert storage.get_bytes(uri) == b"replaced"
    with storage.open_read(uri) as f:
        assert f.read(3) == b"rep" and f.read() == b"laced"


def test_missing_object_is_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.get_bytes(storage.join(root, "nope"))
    with pytest.raises(FileNotFoundError):
        storage.open_read(storage.join(root, "nope"))


def test_list_is_folder_scoped_and_complete(root):
    for name in ("d/x1", "d/x2", "d/sub/y", "dz/other"):
        storage.put_bytes(storage.join(root, name), b"1")
    assert storage.list_uris(storage.join(root, "d")) == [
        storage.join(root, "d/sub/y"),
        storage.join(root, "d/x1"),
        storage.join(root, "d/x2"),
    ]
    assert storage.list_uris(storage.join(root, "missing")) == []


def test_local_put_leaves_no_temporary_files(tmp_path):
    storage.put_bytes(str(tmp_path / "f"), b"x" * 100)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_s3_list_paginates_past_1000_keys(s3_server, s3_root):
    client = s3_server.client()
    bucket, prefix = s3_root[len("s3://") :].split("/", 1)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}/k{i:05d}", Body=b""), range(1105)))
    uris = storage.list_uris(s3_root)
    assert len(uris) == 1105 and uris[0].endswith("k00000") and uris[-1].endswith("k01104")


def test_upload_download_large_file_multipart(root, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(9 * 2**20 + 123)
    src.write_bytes(data)
    uri = storage.join(root, "big.bin")
    storage.upload_file(src, uri)
    dst = tmp_path / "out" / "big.bin"
    storage.download_file(uri, dst)
    assert dst.read_bytes() == data
    if storage.is_s3(uri):
        bucket, key = uri[len("s3://") :].split("/", 1)
        etag = storage._client().head_object(Bucket=bucket, Key=key)["ETag"]
        assert "-" in etag, "a 9 MiB upload should have been multipart"


def test_checks_pass_on_good_locations(root):
    storage.check_writable(root)
    storage.put_bytes(storage.join(root, "x"), b"1")
    storage.check_readable(root)
    assert storage.list_uris(root) == [storage.join(root, "x")], "the write probe must not be left behind"


def test_missing_bucket_fails_fast_naming_uri(s3_server):
    uri = "s3://no-such-bucket-here/x"
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/x.*bucket 'no-such-bucket-here' does not exist"):
        storage.check_readable(uri)
    with pytest.raises(StorageError, match="does not exist"):
        storage.check_writable(uri)


def test_wrong_secret_is_refused_with_clear_message(s3_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Zq9wrongSecretValue")
    with pytest.raises(StorageError) as info:
        storage.check_writable(s3_root)
    message = str(info.value)
    assert s3_root in message and "credentials refused" in message
    assert "Zq9wrongSecretValue" not in message


def test_unreachable_endpoint_fails_fast(s3_root, monkeypatch):
    from pipelines.stack import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        storage.check_readable(s3_root)


def test_local_checks_name_the_path(tmp_path):
    with pytest.raises(StorageError, match=str(tmp_path / "absent")):
        storage.check_readable(str(tmp_path / "absent"))
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable(str(blocker / "sub"))


def test_aws_settings_carry_the_endpoint_but_never_a_credential(s3_server):
    settings = storage.aws_settings()
    assert settings["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert all(k.startswith("AWS_") for k in settings)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & settings.keys()
    assert s3_server.secret_key not in repr(settings) and s3_server.access_key not in repr(settings)


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def test_network_faults_and_server_errors_are_transient_and_input_faults_are_not():
    transient = [
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(104, "reset"),
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        storage.StorageError("s3://b/k: cannot reach the S3 endpoint", transient=True),
    ]
    permanent = [
        FileNotFoundError("s3://b/k"),
        _client_error("AccessDenied", 403),
        _client_error("NoSuchBucket", 404),
        storage.StorageError("s3://b/k: credentials refused"),
        ValueError("bad value"),
    ]
    assert all(storage.is_transient(exc) for exc in transient)
    assert not any(storage.is_transient(exc) for exc in permanent)
    try:
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert storage.is_transient(wrapped)


def test_an_unreachable_endpoint_is_a_transient_storage_error(s3_root, monkeypatch):
    from pipelines.stack import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(Exception) as caught:
        storage.get_bytes(storage.join(s3_root, "anything"))
    assert storage.is_transient(caught.value)


def test_join_handles_slashes():
    assert storage.join("s3://b/p/", "/x/", "y") == "s3://b/p/x/y"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"


def test_open_write_streams_large_objects_and_leaves_nothing_on_failure(root):
    uri = storage.join(root, "streamed.bin")
    chunks = [os.urandom(1 << 20) for _ in range(10)]
    with storage.open_write(uri) as f:
        for chunk in chunks:
            f.write(chunk)
    assert storage.get_bytes(uri) == b"".join(chunks)
    failed = storage.join(root, "failed.bin")
    with pytest.raises(RuntimeError, match="producer broke"):
        with storage.open_write(failed) as f:
            for chunk in chunks:
                f.write(chunk)
            raise RuntimeError("producer broke")
    small = storage.join(root, "failed-small.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(small) as f:
            f.write(b"partial")
            raise RuntimeError("producer broke")
    assert not storage.exists(failed) and not storage.exists(small)
    assert storage.list_uris(root) == [uri]
