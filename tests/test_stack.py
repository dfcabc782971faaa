"""The local stack CLI (`python -m pipelines.stack`, behind infra/local/*.sh): start, env, a job, stop, start
again; and that the stack is closed: only signed S3 requests get in, nothing listens beyond loopback, and
stop leaves no process behind."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shlex
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import boto3
import psutil
import pytest

from pipelines.stack import free_ports, is_loopback, session_processes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def stack(*args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.stack", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def exported(text: str) -> dict[str, str]:
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in text.splitlines())


def signed_client(folder: Path):
    env = exported(stack("env", "--dir", str(folder)).stdout)
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def weed_processes(state: dict) -> list[psutil.Process]:
    return session_processes(state["s3"]["pid"], state["s3"]["started"])


def ray_processes(state: dict) -> list[psutil.Process]:
    return session_processes(state["ray"]["session"], state["ray"]["started"]) if "ray" in state else []


def listening(procs: list[psutil.Process]) -> set[tuple[str, int]]:
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            found |= {
                (c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN
            }
    return found


@pytest.fixture
def started(tmp_path):
    folder = tmp_path / "stack"
    out = stack("start", "--dir", str(folder), "--ray", "--ray-cpus", "1", "--bucket", "ccstack").stdout
    try:
        yield folder, out
    finally:
        if (folder / "stack.json").exists():
            stack("stop", "--dir", str(folder))


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One stack with a Ray head for the tests that only look at it."""
    folder = tmp_path_factory.mktemp("closed") / "stack"
    stack("start", "--dir", str(folder), "--ray", "--ray-cpus", "1", "--bucket", "ccprobe")
    try:
        yield folder
    finally:
        stack("stop", "--dir", str(folder))


def anonymous(address: tuple[str, int] | str, method: str, path: str, tls: bool) -> tuple[int | None, bytes]:
    """(status, body) of a request with no credentials and no client certificate; (None, b"") when the
    connection or the TLS handshake is refused. ``address`` is (ip, port) or a unix socket path."""
    if isinstance(address, str):
        conn = http.client.HTTPConnection("localhost", timeout=5)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(address)
    elif tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(*address, timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection(*address, timeout=5)
    try:
        conn.request(method, path, body=None if method == "GET" else b"anonymous write")
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):  # ssl.SSLError and connection resets are OSErrors
        return None, b""
    finally:
        conn.close()


def refused(status: int | None, body: bytes) -> bool:
    """No answer, an auth, not-found or method-not-allowed status (S3's answer to an unsigned POST), or
    Go's 400 to plain HTTP on a port that requires TLS."""
    return status is None or status in (401, 403, 404, 405) or (status == 400 and b"HTTPS server" in body)


def test_seaweedfs_answers_only_signed_s3_requests_on_every_port(running):
    bucket, secret = "ccprobe", secrets.token_hex(16).encode()
    client = signed_client(running)
    client.put_object(Bucket=bucket, Key="secret.txt", Body=secret)
    state = json.loads((running / "stack.json").read_text())
    ports = listening(weed_processes(state))
    s3_port = state["s3"]["ports"]["s3"]
    # master, volume, filer, s3, admin: HTTP and gRPC (HTTP + 10000) each
    assert {p for _, p in ports} >= {p + offset for p in state["s3"]["ports"].values() for offset in (0, 10000)}

    reads = [
        f"/{bucket}/secret.txt",
        f"/buckets/{bucket}/secret.txt",
        f"/buckets/{bucket}/",
        "/dir/assign",
        "/dir/status",
        "/vol/status",
        "/cluster/status",
        "/",
    ]
    writes = [f"/{bucket}/anon.txt", f"/buckets/{bucket}/anon.txt", "/submit", "/dir/assign", "/anonbucket"]
    answers = {}
    for address in sorted(ports):
        for tls in (False, True):
            for method, path in [("GET", p) for p in reads] + [(m, p) for m in ("PUT", "POST") for p in writes]:
                answers[address, tls, method, path] = anonymous(address, method, path, tls)
    for method, path in [("GET", f"/buckets/{bucket}/secret.txt"), ("PUT", f"/buckets/{bucket}/anon.txt")]:
        answers[("filer.sock", 0), False, method, path] = anonymous(str(running / "filer.sock"), method, path, False)

    let_in = sorted((key, answer[0]) for key, answer in answers.items() if not refused(*answer) or secret in answer[1])
    assert let_in == []
    assert answers[("127.0.0.1", s3_port), False, "GET", f"/{bucket}/secret.txt"][0] == 403
    assert answers[("filer.sock", 0), False, "PUT", f"/buckets/{bucket}/anon.txt"][0] == 401
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["secret.txt"]
    assert [b["Name"] for b in client.list_buckets()["Buckets"]] == [bucket]


def test_no_process_of_the_stack_listens_beyond_loopback(running):
    state = json.loads((running / "stack.json").read_text())
    weed, ray = listening(weed_processes(state)), listening(ray_processes(state))
    assert ("127.0.0.1", state["s3"]["ports"]["s3"]) in weed
    assert int(state["ray"]["address"].rsplit(":", 1)[1]) in {port for _, port in ray}  # the GCS
    assert len(ray) >= 8
    assert sorted(a for a in weed | ray if not is_loopback(a[0])) == []


def test_stack_start_env_job_and_stop(started):
    folder, out = started
    state = json.loads((folder / "stack.json").read_text())
    assert "s3://ccstack" in out and state["ray"]["dashboard"] in out
    env = exported(stack("env", "--dir", str(folder)).stdout)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "RAY_ADDRESS"} <= env.keys()
    for name in ("ray-token", "s3-identities.json", "security.toml", "tls/weed.key"):
        assert oct((folder / name).stat().st_mode & 0o777) == "0o600", name
    assert oct(folder.stat().st_mode & 0o777) == "0o700"

    # a job through the head's job server writes to the stack's S3 with the exported credentials
    job_env = dict(os.environ, **env)
    job_env.pop("RAY_ADDRESS")
    code = "from system import storage; storage.put_bytes('s3://ccstack/hello.txt', b'hi')"
    job = subprocess.run(
        [RAY, "job", "submit", "--address", state["ray"]["dashboard"], "--", sys.executable, "-c", code],
        cwd=REPO,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    check = "from system import storage; print(storage.get_bytes('s3://ccstack/hello.txt').decode())"
    assert (
        subprocess.run(
            [sys.executable, "-c", check], cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60
        ).stdout.strip()
        == "hi"
    )
    assert len(weed_processes(state)) >= 1 and len(ray_processes(state)) >= 5

    assert "stopped the stack" in stack("stop", "--dir", str(folder)).stdout
    assert not (folder / "stack.json").exists() and (folder / "data").is_dir()
    assert not Path(state["ray"]["temp_dir"]).exists()
    assert weed_processes(state) == [] and ray_processes(state) == []
    assert not psutil.pid_exists(state["s3"]["pid"])
    assert [p.name for p in (folder / "ray-logs").glob("session_*/logs/raylet.out")] == ["raylet.out"]


def test_a_stack_folder_starts_again_with_its_data_credentials_and_bucket(tmp_path):
    folder = tmp_path / "stack"
    stack("start", "--dir", str(folder), "--bucket", "ccagain")
    first = exported(stack("env", "--dir", str(folder)).stdout)
    signed_client(folder).put_object(Bucket="ccagain", Key="kept.txt", Body=b"kept")
    again = stack("start", "--dir", str(folder), "--bucket", "ccagain", ok=False)
    assert f"a stack is already running in {folder}" in again.stderr
    stack("stop", "--dir", str(folder))

    stack("start", "--dir", str(folder), "--bucket", "ccagain")
    state = json.loads((folder / "stack.json").read_text())
    try:
        second = exported(stack("env", "--dir", str(folder)).stdout)
        assert (second["AWS_ACCESS_KEY_ID"], second["AWS_SECRET_ACCESS_KEY"]) == (
            first["AWS_ACCESS_KEY_ID"],
            first["AWS_SECRET_ACCESS_KEY"],
        )
        assert signed_client(folder).get_object(Bucket="ccagain", Key="kept.txt")["Body"].read() == b"kept"
    finally:
        stack("stop", "--dir", str(folder))
    assert weed_processes(state) == []


def test_seaweedfs_ports_never_collide_with_each_others_grpc_ports():
    for _ in range(3000):  # a random collision is rare: many draws make missing the guard show
        ports = free_ports(5, grpc_pairs=True)
        used = set(ports) | {p + 10000 for p in ports}
        assert len(used) == 10, f"{ports}: one port is another's gRPC port (weed mini refuses to start)"
