"""The embedded local stack: a SeaweedFS S3 server (``weed mini``) and optionally a Ray head.

A laptop, the integration tests and ``make demo`` all run the cluster's code path against these.
Everything listens on loopback only, on free ports picked at start, and nothing answers without
credentials kept (owner-only) in the stack folder:

- SeaweedFS: the S3 port requires signed requests (``s3-identities.json``). Every other port, the
  master, volume, filer and admin HTTP ports and all gRPC ports (HTTP port + 10000), requires a client
  certificate of the stack's own CA (``tls/``, mutual TLS via ``security.toml``, which weed reads from
  its working directory). JWT keys (also in ``security.toml``) sign every volume and filer read and
  write as a second lock; they also guard the filer's unix socket, which serves plain HTTP. WebDAV,
  which has no authentication, is off.
- Ray: Ray binds loopback only when the node address is ``127.0.0.1`` (its ``is_localhost``); any other
  address, ``127.0.0.2`` included, puts the GCS, raylet, agent and metrics servers on every interface.
  ``ray start`` on Linux swaps ``127.0.0.1`` for the machine's address unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-machine mode, which also refuses other nodes), so the
  head runs with it, and so must its drivers: ``RayHead.env()`` carries it. Token auth is on.

Each server runs in its own session; ``stop`` ends every process of that session (and their
descendants), found by session id rather than by name. A stack folder can be started again after a
stop: it keeps its data, credentials, keys and certificates.

Library use (test fixtures)::

    server = start_s3(workdir, buckets=("data",))   # -> S3Server (endpoint, env(), stop())
    ray_head = start_ray_head(workdir, num_cpus=2)   # -> RayHead (address, env(), stop())

Command line (``infra/local/*.sh`` call these)::

    python -m pipelines.stack start [--dir DIR] [--bucket NAME] [--ray] [--ray-cpus N]
    python -m pipelines.stack env [--dir DIR]      # prints `export AWS_...=...` lines to eval
    python -m pipelines.stack stop [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import boto3
import psutil
from botocore.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DIR = Path(os.environ.get("CLUSTERCAM_STACK_DIR", Path.home() / ".clustercam-stack"))
_WEED_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000
_HTTPS_SERVICES = ("master", "volume", "filer", "admin")  # HTTP ports that require a client certificate
_GRPC_SERVICES = ("master", "volume", "filer", "s3", "admin", "worker", "client")
_JWT_KEYS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
_RAY_IP = "127.0.0.1"
_RAY_SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_RAY_SESSION_SKIP = {"sockets", "runtime_resources"}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, grpc_pairs: bool = False) -> list[int]:
    """Distinct free loopback ports; with ``grpc_pairs`` port+10000 must be free too, and no port may be
    another's port+10000 (SeaweedFS derives each gRPC port so and refuses such a pair at start)."""
    ports: list[int] = []
    taken: set[int] = set()
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in taken:
            continue
        if grpc_pairs:
            grpc = port + _GRPC_OFFSET
            if port < 20000 or grpc > 65535 or grpc in taken or not _port_free(grpc):
                continue
            taken.add(grpc)
        taken.add(port)
        ports.append(port)
    return ports


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8 and ::1, also written IPv4-mapped (``::ffff:127.0.0.1``, how Ray's gRPC binds)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _write_private(path: Path, data: str | bytes) -> None:
    """Create or replace ``path`` readable by its owner only: keys, tokens, credentials."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGINT the server when the process that started it dies, so a
    killed test run or benchmark does not leave an S3 server behind (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)


def session_processes(sid: int, since: float) -> list[psutil.Process]:
    """The processes of session ``sid`` created at or after ``since`` (the leader's start: a session id
    reused later never matches), plus their descendants, even those that moved to a session of their own."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["create_time"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == sid and proc.info["create_time"] >= since - 0.05:
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:  # dead already, waiting for its parent to reap it
                alive.append(proc)
    return alive


def _end_session(sid: int, since: float, sig: signal.Signals, grace_s: float = 10.0) -> None:
    """Send ``sig`` to every process of the session, SIGKILL what is left after ``grace_s`` (and what
    was spawned meanwhile), until none is left."""
    procs = session_processes(sid, since)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    psutil.wait_procs(procs, timeout=grace_s)
    for _ in range(10):
        alive = session_processes(sid, since)
        if not alive:
            return
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
    raise RuntimeError(f"processes of session {sid} survive SIGKILL: {[p.pid for p in session_processes(sid, since)]}")


def _leader_start(proc: subprocess.Popen, before: float) -> float:
    try:
        return psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        return before


def _credentials(workdir: Path, create: bool = True) -> tuple[str, str]:
    """(access key, secret key) of the stack folder's S3 identity, generated on its first start."""
    path = workdir / "s3-identities.json"
    if path.exists():
        try:
            creds = json.loads(path.read_text())["identities"][0]["credentials"][0]
            return creds["accessKey"], creds["secretKey"]
        except (ValueError, LookupError, TypeError) as e:
            raise RuntimeError(
                f"{path}: not an identities file of this stack ({e!r}); delete it to get new credentials"
            ) from None
    if not create:
        raise RuntimeError(f"{path} is missing: the stack folder has no S3 credentials")
    access_key, secret_key = "cc" + secrets.token_hex(8), secrets.token_hex(20)
    _write_private(
        path,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        ),
    )
    return access_key, secret_key


def _tls_files(tls: Path) -> None:
    """A CA and one certificate for both ends of every SeaweedFS connection (``ca.crt``, ``weed.crt``,
    ``weed.key``), made once per stack folder and again when expiring. The CA key is dropped: nothing
    else is ever signed, so no one can mint a client certificate later."""
    now = datetime.datetime.now(datetime.UTC)
    cert_path, key_path, ca_path = tls / "weed.crt", tls / "weed.key", tls / "ca.crt"
    if key_path.exists() and ca_path.exists() and cert_path.exists():
        expires = x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc
        if expires > now + datetime.timedelta(days=1):
            return
    _private_dir(tls)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=825),
    }
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clustercam local stack CA")])
    ca = (
        x509.CertificateBuilder(
            subject_name=ca_name,
            issuer_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))


def _security_toml(path: Path) -> None:
    """weed's security.toml: mutual TLS on every HTTP port but S3's and on every gRPC port, JWT keys for
    volume and filer reads and writes (kept from the folder's earlier starts), no unauthenticated UIs.
    Paths are relative to weed's working directory, the stack folder."""
    keys = {name: secrets.token_hex(32) for name in _JWT_KEYS}
    if path.exists():
        try:
            old = tomllib.loads(path.read_text())
            for name in _JWT_KEYS:
                section = old
                for part in name.split("."):
                    section = section[part]
                keys[name] = str(section["key"])
        except (tomllib.TOMLDecodeError, LookupError, TypeError) as e:
            raise RuntimeError(
                f"{path}: not a security.toml of this stack ({e!r}); delete it to get new keys"
            ) from None
    cert, key, ca = 'cert = "tls/weed.crt"', 'key = "tls/weed.key"', 'ca = "tls/ca.crt"'
    lines = [line for name in _JWT_KEYS for line in (f"[{name}]", f'key = "{keys[name]}"')]
    lines += ["[access]", "ui = false", "[filer.expose_directory_metadata]", "enabled = false", "[grpc]", ca]
    lines += [line for service in _GRPC_SERVICES for line in (f"[grpc.{service}]", cert, key)]
    lines += ["[https.client]", "enabled = true", cert, key, ca]
    lines += [line for service in _HTTPS_SERVICES for line in (f"[https.{service}]", cert, key, ca)]
    _write_private(path, "\n".join(lines) + "\n")


@dataclass
class S3Server:
    """A running ``weed mini``; ``env()`` is what clients need (boto3 reads these variables)."""

    pid: int  # also its session id: it runs as a session leader
    endpoint: str
    access_key: str
    secret_key: str
    workdir: str
    ports: dict[str, int] = field(default_factory=dict)
    region: str = "us-east-1"
    started: float = 0.0  # the process's creation time

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"mode": "standard", "max_attempts": 3}),
        )

    def stop(self) -> None:
        """SIGINT (weed mini shuts down cleanly on it), SIGKILL whatever of its session is left."""
        _end_session(self.pid, self.started, signal.SIGINT)
        for sock in ("filer.sock", "s3.sock"):
            (Path(self.workdir) / sock).unlink(missing_ok=True)
        tmp = Path(tempfile.gettempdir())
        for port in self.ports.values():
            for sock in tmp.glob(f"seaweedfs-*-{port + _GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_s3(
    workdir: str | Path,
    buckets: tuple[str, ...] = (),
    timeout_s: float = 60.0,
    detach: bool = False,
    ports: dict[str, int] | None = None,
) -> S3Server:
    """Start ``weed mini`` with data, credentials, keys and certificates under ``workdir`` (reused when
    there from an earlier start); returns once S3 answers. Buckets that exist already are fine.

    ``detach`` (the command line's ``start``) lets the server outlive this process; otherwise it is
    stopped when this process dies, however it dies. ``ports`` (an earlier server's) brings a server
    back at the same endpoint, so clients that knew the old one carry on."""
    workdir = _private_dir(Path(workdir).resolve())
    (workdir / "data").mkdir(exist_ok=True)
    access_key, secret_key = _credentials(workdir)
    _tls_files(workdir / "tls")
    _security_toml(workdir / "security.toml")
    ports = dict(ports or zip(_WEED_SERVICES, free_ports(len(_WEED_SERVICES), grpc_pairs=True)))
    cmd = [
        _weed_binary(),
        "mini",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-dir={workdir / 'data'}",
        f"-s3.config={workdir / 's3-identities.json'}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]
    env = dict(os.environ, GOMEMLIMIT="256MiB")
    log = open(workdir / "weed.log", "ab")
    before = time.time()
    # umask 077: its unix sockets (some in /tmp) and files are the owner's alone
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        umask=0o077,
        preexec_fn=None if detach or not sys.platform.startswith("linux") else _die_with_parent,
    )
    log.close()
    server = S3Server(
        proc.pid,
        f"http://127.0.0.1:{ports['s3']}",
        access_key,
        secret_key,
        str(workdir),
        ports,
        started=_leader_start(proc, before),
    )
    client = server.client()
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {workdir / 'weed.log'}")
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"weed mini did not answer within {timeout_s:.0f} s; see {workdir / 'weed.log'}"
                ) from None
            time.sleep(0.3)
    try:
        # Right after a restart SeaweedFS may answer a re-create of an existing bucket with
        # BucketAlreadyExists rather than ...OwnedByYou; on this private server both mean it is ours.
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        taken = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        for bucket in buckets:
            if bucket not in existing:
                with contextlib.suppress(*taken):
                    client.create_bucket(Bucket=bucket)
    except Exception:
        server.stop()
        raise
    return server


@dataclass
class RayHead:
    """A ``ray start --head`` on loopback; its processes are the members of one session."""

    address: str
    temp_dir: str
    token_path: str
    dashboard: str = ""  # http address of the job server (`ray job submit --address`) and the state API
    session: int = 0  # session id of every process the head started (`ray start` ran as its leader)
    started: float = 0.0  # creation time of that leader
    logs_dir: str = ""  # stop() moves the head's logs here, one folder per Ray session

    def env(self) -> dict[str, str]:
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            **_RAY_SINGLE_MACHINE,
        }

    def stop(self) -> None:
        """End every process of the head's session (`ray stop` would kill every Ray on the machine), keep
        its session records in ``logs_dir``, delete its temp dir.

        Kept: everything of each Ray session but its sockets and ``runtime_resources`` (unpacked job
        code): logs, ports and metadata, what a person debugging a run (or a test looking for a leaked
        secret) reads after the stack is gone."""
        _end_session(self.session, self.started, signal.SIGTERM)
        if self.logs_dir:
            for session in sorted(Path(self.temp_dir).glob("session_*")):
                if session.is_symlink() or not session.is_dir():  # session_latest
                    continue
                keep = _private_dir(Path(self.logs_dir)) / session.name
                for item in session.iterdir():
                    if item.name not in _RAY_SESSION_SKIP and not item.is_socket():
                        with contextlib.suppress(FileNotFoundError):  # a port file Ray removes on its way out
                            shutil.move(str(item), keep / item.name)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(
    workdir: str | Path, num_cpus: int = 2, memory_gb: float = 4.0, env: dict[str, str] | None = None
) -> RayHead:
    """``env`` is added to the head's environment, which its jobs and workers inherit: the local
    stack passes the S3 endpoint and credentials so a bare ``ray job submit`` can reach storage."""
    workdir = _private_dir(Path(workdir).resolve())
    temp_dir = Path(tempfile.mkdtemp(prefix="ccray-"))
    token_path = workdir / "ray-token"
    if not token_path.exists():
        _write_private(token_path, secrets.token_hex(32))
    (
        port,
        client_port,
        manager_port,
        object_port,
        metrics_port,
        dashboard_port,
        agent_port,
        agent_grpc_port,
        runtime_env_port,
        autoscaler_metrics_port,
        dashboard_metrics_port,
    ) = free_ports(11)
    env = dict(
        os.environ,
        **(env or {}),
        **_RAY_SINGLE_MACHINE,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        # fixed defaults (44217, 44227) otherwise: a second head on the machine could not bind them
        AUTOSCALER_METRIC_PORT=str(autoscaler_metrics_port),
        DASHBOARD_METRIC_PORT=str(dashboard_metrics_port),
    )
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--node-ip-address={_RAY_IP}",
        f"--port={port}",
        f"--ray-client-server-port={client_port}",
        f"--node-manager-port={manager_port}",
        f"--object-manager-port={object_port}",
        f"--metrics-export-port={metrics_port}",
        # the dashboard serves `ray job submit` and the state API, which Ray Train's placement-group
        # cleaner polls every second (a warning per poll without it)
        "--include-dashboard=true",
        f"--dashboard-host={_RAY_IP}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--dashboard-agent-grpc-port={agent_grpc_port}",
        f"--runtime-env-agent-port={runtime_env_port}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        f"--memory={int(memory_gb * 2**30)}",
        f"--object-store-memory={int(memory_gb * 2**30 / 4)}",
        "--disable-usage-stats",
    ]
    before = time.time()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    head = RayHead(
        f"{_RAY_IP}:{port}",
        str(temp_dir),
        str(token_path),
        f"http://{_RAY_IP}:{dashboard_port}",
        session=proc.pid,
        started=_leader_start(proc, before),
        logs_dir=str(workdir / "ray-logs"),
    )
    out, err = proc.communicate()
    if proc.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start failed:\n{out[-2000:]}\n{err[-2000:]}")
    return head


def _state_file(stack_dir: Path) -> Path:
    return stack_dir / "stack.json"


def _load_state(stack_dir: Path) -> tuple[dict, S3Server, RayHead | None]:
    state_path = _state_file(stack_dir)
    if not state_path.exists():
        sys.exit(f"no stack recorded in {stack_dir}")
    state = json.loads(state_path.read_text())
    s3 = state["s3"]
    access_key, secret_key = _credentials(stack_dir, create=False)
    server = S3Server(
        s3["pid"], s3["endpoint"], access_key, secret_key, str(stack_dir), s3["ports"], started=s3["started"]
    )
    return state, server, RayHead(**state["ray"]) if "ray" in state else None


def _stop_recorded(stack_dir: Path) -> None:
    _, server, head = _load_state(stack_dir)
    if head:
        head.stop()
    server.stop()
    _state_file(stack_dir).unlink()


def _cmd_start(args) -> None:
    stack_dir = Path(args.dir).resolve()
    if _state_file(stack_dir).exists():
        _, server, head = _load_state(stack_dir)
        if session_processes(server.pid, server.started) or (head and session_processes(head.session, head.started)):
            sys.exit(
                f"a stack is already running in {stack_dir}; "
                f"run `python -m pipelines.stack stop --dir {stack_dir}` first"
            )
        _stop_recorded(stack_dir)  # it died without a stop: clear what it left
    server = start_s3(stack_dir, buckets=(args.bucket,), detach=True)
    state = {
        "s3": {
            "pid": server.pid,
            "started": server.started,
            "endpoint": server.endpoint,
            "ports": server.ports,
            "bucket": args.bucket,
        }
    }
    if args.ray:
        try:
            head = start_ray_head(stack_dir, num_cpus=args.ray_cpus, env=server.env())
        except Exception:
            server.stop()
            raise
        state["ray"] = asdict(head)
    _state_file(stack_dir).write_text(json.dumps(state, indent=1))
    print(
        f"S3 endpoint {server.endpoint}, bucket s3://{args.bucket}"
        + (f", Ray at {head.address} (jobs: ray job submit --address {head.dashboard})" if args.ray else "")
    )
    print(f'eval "$(python -m pipelines.stack env --dir {stack_dir})" to use it')


def _cmd_env(args) -> None:
    _, server, head = _load_state(Path(args.dir).resolve())
    env = server.env()
    if head:
        env.update(head.env())
    for key, value in env.items():
        print(f"export {key}={value}")


def _cmd_stop(args) -> None:
    stack_dir = Path(args.dir).resolve()
    _stop_recorded(stack_dir)
    print(
        f"stopped the stack in {stack_dir} (data kept in {stack_dir / 'data'}"
        + (f", Ray logs in {stack_dir / 'ray-logs'})" if (stack_dir / "ray-logs").is_dir() else ")")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stack", description="local S3 server + Ray head")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("--bucket", default="clustercam")
    start.add_argument("--ray", action="store_true", help="also start a Ray head on 127.0.0.1")
    start.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    for p in (start, sub.add_parser("env"), sub.add_parser("stop")):
        p.add_argument("--dir", default=str(DEFAULT_DIR), help="stack folder (data, credentials, state)")
    args = parser.parse_args(argv)
    {"start": _cmd_start, "env": _cmd_env, "stop": _cmd_stop}[args.command](args)


if __name__ == "__main__":
    main()
