"""Start the stand-in OpenAI-compatible server (``scripts/stand_in_openai.py``) for a test, and read its counters."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "stand_in_openai.py"


@dataclass
class StandIn:
    proc: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT/v1

    def _call(self, path: str, body: dict | None = None) -> dict:
        root = self.base_url.rsplit("/v1", 1)[0]
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(root + path, data=data), timeout=10) as r:  # nosec B310
            return json.loads(r.read())

    def stats(self) -> dict:
        return self._call("/stats")

    def reset(self) -> dict:
        return self._call("/stats/reset", {})

    def control(self, **values) -> dict:
        return self._call("/control", values)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def start_stand_in(*args: str) -> StandIn:
    """``scripts/stand_in_openai.py ARGS`` on a free port."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"(http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the stand-in did not start: {line!r}")
    return StandIn(proc, match.group(1))
