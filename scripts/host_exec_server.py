"""The host side of tests/host_exec.py: runs the engine venv's commands for the plugin tests in the QGIS 3.40
chroot. Loopback only, a random token, standard library only; it exits when its parent (the test script) does.

    python3 scripts/host_exec_server.py PORT_FILE     # writes "port token" to PORT_FILE, then serves
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

TOKEN = secrets.token_hex(16)
PROCS: dict[int, subprocess.Popen] = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.headers.get("X-Token") != TOKEN:
            self.send_error(401)
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        env = {**os.environ, **(body.get("env") or {})}
        if self.path == "/run":
            try:
                p = subprocess.run(body["cmd"], env=env, cwd=body.get("cwd"), capture_output=True, text=True,
                                   timeout=body.get("timeout", 600), check=False)  # fmt: skip
                out = {"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
            except subprocess.TimeoutExpired as exc:
                out = {"returncode": -9, "stdout": str(exc.stdout or ""), "stderr": "timed out"}
        elif self.path == "/spawn":
            with open(body["log"], "wb") as log:
                p = subprocess.Popen(body["cmd"], env=env, stdout=log, stderr=subprocess.STDOUT)
            PROCS[p.pid] = p
            out = {"pid": p.pid}
        elif self.path == "/poll":
            out = {"returncode": PROCS[body["pid"]].poll()}
        elif self.path == "/stop":
            p = PROCS.pop(body["pid"])
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=body.get("timeout", 30))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            out = {"returncode": p.returncode}
        else:
            self.send_error(404)
            return
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    # Started in the background by a script, this process ignores SIGINT (bash does that to background jobs)
    # and its children would inherit that: a test's Ctrl-C to `geo-r1 ground` would be lost. Restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1], "w", encoding="ascii") as fh:
        fh.write(f"{server.server_address[1]} {TOKEN}\n")
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        for p in PROCS.values():
            p.kill()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    try:
        server.serve_forever()
    finally:
        for p in PROCS.values():
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
