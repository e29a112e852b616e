"""A real Ray cluster on this machine for the tests and the benchmark (``tests/engine/test_ray_ground.py``,
``scripts/bench_ray.py``): a head and worker nodes, each ``ray start --block`` in its own process group, in a
temporary folder, on free ports, with a token of their own; stopped (and the folder removed) by :meth:`stop`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A head and a worker node on this machine (``ray start --block``, each in its own process group)."""

    def __init__(self, head_cpus: float = 2, worker_cpus: tuple[float, ...] = (1,)) -> None:
        # Ray's socket paths live under its temp dir and must stay short (107 bytes): not under pytest's tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="geo-r1-ray-", dir="/tmp"))
        token = self.dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            # a killed node is found dead within about 2 s (Ray's default: 15 s or more)
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        }
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", str(head_cpus), "--temp-dir",
                             str(self.dir), "--include-dashboard=false"])  # fmt: skip
        for i, cpus in enumerate(worker_cpus):
            self._start(f"worker{i or ''}", ["--address", self.address, "--num-cpus", str(cpus)])

    def _start(self, name: str, args: list[str]) -> None:
        ports = []
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):  # fmt: skip
            ports += [flag, str(free_port())]
        cmd = [str(RAY_BIN), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args,
               *ports]  # fmt: skip
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115  (closed with the cluster)
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (self.dir / f"{name}.log").read_bytes():
            assert self.nodes[name].poll() is None, f"ray start ({name}) exited: {self.log(name)}"
            assert time.monotonic() < deadline, f"ray start ({name}) did not start: {self.log(name)}"
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]

    def kill(self, name: str) -> None:
        """SIGKILL a node and every process it started (raylet, object store, its workers and actors)."""
        proc = self.nodes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            proc = self.nodes[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def ground(self, *argv: str | Path, wait: bool = True) -> subprocess.Popen:
        """``geo-r1 ground ... --ray ADDRESS`` as a process of its own (the driver); with ``wait``, waited for, its
        output (stdout and stderr) in ``.output``."""
        cmd = [sys.executable, "-m", "engine.cli", "ground", *map(str, argv), "--ray", self.address]
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        if wait:
            proc.output = proc.communicate(timeout=600)[0]  # type: ignore[attr-defined]
        return proc
