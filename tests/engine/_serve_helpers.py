"""Start and stop real ``geo-r1 serve`` processes for the end-to-end tests; small image helpers."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

#: A graceful stop: uvicorn finishes its shutdown, then re-raises the SIGTERM it caught.
CLEAN_EXIT = (0, -signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def geo_r1_command() -> list[str]:
    script = Path(sys.executable).with_name("geo-r1")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "engine.cli"]


@dataclass
class EngineProcess:
    url: str
    token: str
    token_file: Path
    proc: subprocess.Popen
    log_path: Path

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120.0, trust_env=False, **kwargs)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_engine(workdir: Path, args: list[str], env: dict[str, str] | None = None, timeout_s: float = 240.0):
    """Run ``geo-r1 serve ARGS`` on a free port with a fresh token file; wait until /health answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token_file = workdir / "config" / "geo-r1" / "engine.token"
    log_path = workdir / "engine.log"
    # XDG_DATA_HOME under the workdir: the engine's default --jobs-dir is never the user's own
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "XDG_DATA_HOME": str(workdir / "data"),
        **(env or {}),
    }
    cmd = [*geo_r1_command(), "serve", "--port", str(port), "--token-file", str(token_file), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    engine = EngineProcess(f"http://127.0.0.1:{port}", "", token_file, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"geo-r1 serve exited with {proc.returncode}:\n{engine.log_tail()}")
        try:
            if httpx.get(engine.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            engine.stop()
            raise RuntimeError(f"geo-r1 serve did not answer /health within {timeout_s} s:\n{engine.log_tail()}")
        time.sleep(0.25)
    engine.token = token_file.read_text().strip()
    return engine


def serving(workdir: Path, args: list[str], env: dict[str, str] | None = None):
    """A module fixture's body: ``yield from serving(dir, args)`` starts the engine, yields it, and at the end
    asserts that it stopped cleanly (the log's tail when not)."""
    engine = start_engine(workdir, args, env)
    yield engine
    assert engine.stop() in CLEAN_EXIT, engine.log_tail()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + b64(encoded(image))


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    """The response is ``status`` with the engine's JSON error shape, mentioning every fragment."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    error = body["error"]
    assert error["code"] == status and isinstance(error["type"], str) and error["message"]
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    return error


def tank_annotations(root: Path) -> Path:
    """An annotation GeoPackage of two sample scenes' storage tanks (seed 3's as train boxes, seed 4's as val),
    written with train/dataset.py's own writer; the scenes' rasters lie beside it (scene3/, scene4/)."""
    import json

    import shapely

    from geo_r1_qgis.core.annotations import Annotation
    from train.dataset import write_annotations
    from train.sample_data import SampleDataConfig, write_samples

    items = []
    for seed, split in ((3, "train"), (4, "val")):
        scene = root / f"scene{seed}"
        write_samples(SampleDataConfig(out_dir=scene, seed=seed, size=256))
        for f in json.loads((scene / "utm.objects.geojson").read_text())["features"]:
            if f["properties"]["category"] == "tank":
                ann = Annotation(expression="storage tank", raster=str(scene / "utm.tif"), split=split,
                                 created="2025-01-01T00:00:00+00:00")  # fmt: skip
                items.append((ann, shapely.Polygon(f["geometry"]["coordinates"][0])))
    path = root / "tanks.gpkg"
    write_annotations(path, items, "EPSG:32614")
    return path
