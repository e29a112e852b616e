"""``POST /shutdown`` and ``--parent-pid`` on real ``geo-r1 serve`` processes (the tiny model, one thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _serve_helpers import assert_error, free_port, geo_r1_command, start_engine

pytestmark = pytest.mark.slow


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left (an orphan whose reaper has not run yet)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.2)
    return _gone(pid)


def test_shutdown_needs_the_token_answers_202_then_exits_cleanly(tiny_model_dir, tmp_path):
    eng = start_engine(tmp_path, ["--model", str(tiny_model_dir), "--threads", "1"])
    try:
        assert_error(httpx.post(eng.url + "/shutdown", trust_env=False), 401, "Bearer")
        assert eng.proc.poll() is None, "a request without the token stopped the engine"
        schema = eng.client().get("/openapi.json").json()
        assert "202" in schema["paths"]["/shutdown"]["post"]["responses"]
        with eng.client() as api:
            r = api.post("/shutdown")
        assert r.status_code == 202 and r.json() == {"status": "stopping"}
        assert eng.proc.wait(timeout=60) == 0, eng.log_tail()
        assert "shutdown requested over HTTP" in eng.log_tail()
        with pytest.raises(httpx.TransportError):
            httpx.get(eng.url + "/health", timeout=2.0, trust_env=False)
    finally:
        eng.stop()


PARENT = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[1:] + ["--parent-pid", str(__import__("os").getpid())])
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the orphaned engine end")
def test_an_engine_stops_itself_when_the_process_that_started_it_is_killed(tiny_model_dir, tmp_path):
    token_file = tmp_path / "engine.token"
    port = free_port()
    serve = [*geo_r1_command(), "serve", "--model", str(tiny_model_dir), "--threads", "1", "--port", str(port),
             "--token-file", str(token_file)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *serve], stdout=subprocess.PIPE, text=True, env=env)
    engine_pid = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 240
        while True:  # healthy first: the watch must also work once the server runs
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and not _gone(engine_pid), "the engine did not start"
            time.sleep(0.25)
        parent.send_signal(signal.SIGKILL)  # no chance to clean up: only the engine's own watch can act
        parent.wait(timeout=10)
        assert _wait_gone(engine_pid, 60), "the engine outlived the process that started it"
    finally:
        if not _gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
