"""A real multi-node Ray cluster on this machine, started with `ray start` the way users start one.

Nodes live on 127.0.0.2 (head) and 127.0.0.3, 127.0.0.4, ... with their own ports and temp dirs.
`ray stop` would kill every Ray process on the machine (the test session's own cluster too), so the
cluster is stopped through its processes: everything whose command line names its temp dirs, and
their children.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    root: Path
    env: dict
    head_ip: str = "127.0.0.2"
    gcs_port: int = 0
    dashboard_port: int = 0
    temp_dirs: list[str] = field(default_factory=list)
    # workers listen below the ephemeral range (32768+) that free_port() draws from, so no other
    # port of the cluster can fall inside a node's worker range; each node gets its own range
    next_worker_port: int = 20000

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        low, self.next_worker_port = self.next_worker_port, self.next_worker_port + 300
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 200}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]

    def _start(self, args: list[str]) -> None:
        subprocess.run([RAY, "start", *args], env=self.env, check=True, capture_output=True, timeout=120)

    def start_head(self, num_cpus: int = 1) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        temp = tempfile.mkdtemp(prefix="ccrh-", dir="/tmp")
        self.temp_dirs.append(temp)
        self._start(
            [
                "--head",
                f"--node-ip-address={self.head_ip}",
                f"--port={self.gcs_port}",
                f"--num-cpus={num_cpus}",
                f"--temp-dir={temp}",
                "--include-dashboard=true",
                f"--dashboard-host={self.head_ip}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                "--memory=3000000000",
                "--object-store-memory=200000000",
                "--disable-usage-stats",
                *self._ports(),
            ]
        )

    def add_node(self, ip: str, num_cpus: int = 1) -> None:
        temp = tempfile.mkdtemp(prefix="ccrw-", dir="/tmp")
        self.temp_dirs.append(temp)
        self._start(
            [
                f"--address={self.head_ip}:{self.gcs_port}",
                f"--node-ip-address={ip}",
                f"--num-cpus={num_cpus}",
                f"--temp-dir={temp}",
                "--memory=3000000000",
                "--object-store-memory=200000000",
                "--disable-usage-stats",
                *self._ports(),
            ]
        )

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        script = "import ray; ray.init(address='auto'); print(len([n for n in ray.nodes() if n['Alive']]))"
        deadline = time.time() + timeout
        env = {**self.env, "RAY_ADDRESS": f"{self.head_ip}:{self.gcs_port}"}
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} nodes")

    def processes(self) -> list[psutil.Process]:
        found = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if any(t in cmd for t in self.temp_dirs) or ("ray" in cmd and f":{self.gcs_port}" in cmd):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def local_cluster_env(root: Path) -> dict:
    """The environment of `ray start` / `ray job submit`: token auth with a token of our own."""
    token = root / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    return env
