"""Run the engine's venv commands from the plugin tests, also when those tests run inside the QGIS 3.40 chroot.

The plugin's tests run under QGIS's own Python. Some of them also need the engine's venv (sample rasters, the
tiny model, a real engine). On the host that is a plain subprocess. Inside the Debian 13 chroot the venv cannot
run (it was built for the host's Python), so ``scripts/test_plugin_qgis340.sh`` starts
``scripts/host_exec_server.py`` on the host and sets ``GEO_R1_HOST_EXEC=host:port`` and
``GEO_R1_HOST_EXEC_TOKEN``; the chroot shares the host's loopback and, through bind mounts, its paths (the
repository, ``../shared`` and ``/tmp``), so the same command lines work on both sides. Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ADDR = os.environ.get("GEO_R1_HOST_EXEC")
_TOKEN = os.environ.get("GEO_R1_HOST_EXEC_TOKEN", "")


def remote() -> bool:
    return bool(_ADDR)


def _call(route: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{_ADDR}{route}", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Token": _TOKEN})  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # nosec B310 (loopback, our own helper)
        return json.loads(resp.read())


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run(cmd, capture_output=True, text=True)`` on the host."""
    cmd = [str(c) for c in cmd]
    if not remote():
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    out = _call("/run", {"cmd": cmd, "env": _delta(env), "cwd": str(cwd) if cwd else None, "timeout": timeout},
                timeout + 30)  # fmt: skip
    return subprocess.CompletedProcess(cmd, out["returncode"], out["stdout"], out["stderr"])


def _delta(env: dict[str, str] | None) -> dict[str, str] | None:
    """Only what the caller set beyond this process's environment (the host has its own PATH etc.)."""
    if env is None:
        return None
    return {k: v for k, v in env.items() if os.environ.get(k) != v and not k.startswith("GEO_R1_HOST_EXEC")}


@dataclass
class HostProcess:
    """A long-running process on the host (an engine): ``poll()`` and ``stop()`` like a Popen."""

    pid: int
    local: subprocess.Popen | None = None

    def poll(self) -> int | None:
        if self.local is not None:
            return self.local.poll()
        return _call("/poll", {"pid": self.pid}, 30)["returncode"]

    def stop(self, timeout: float = 30) -> None:
        if self.local is not None:
            if self.local.poll() is None:
                self.local.terminate()
                try:
                    self.local.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.local.kill()
                    self.local.wait(timeout=10)
            return
        _call("/stop", {"pid": self.pid, "timeout": timeout}, timeout + 30)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A background job (``make test &``, CI runners) starts
    with SIGINT ignored, Python then installs no KeyboardInterrupt handler, and a test's Ctrl-C is lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(cmd: list[str], *, log_path: Path, env: dict[str, str] | None = None) -> HostProcess:
    """Start ``cmd`` on the host, output to ``log_path`` (a path both sides see)."""
    cmd = [str(c) for c in cmd]
    if not remote():
        with open(log_path, "wb") as log:  # Ctrl-C reaches it even when the tests run as a background job
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,  # nosec B603
                                    preexec_fn=_default_sigint)  # fmt: skip
        return HostProcess(proc.pid, proc)
    out = _call("/spawn", {"cmd": cmd, "env": _delta(env), "log": str(log_path)}, 60)
    time.sleep(0.1)
    return HostProcess(int(out["pid"]))
