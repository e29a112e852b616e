"""``geo-r1 wheelhouse DIR``: everything the engine needs, as wheel files in one folder, for an offline setup.

Run it on a machine with network access, carry ``DIR`` to the offline one, and pick it as the source in the
plugin's "Set up the Geo-R1 engine" dialog (or ``pip install --no-index --find-links DIR geo-r1``). It runs
``pip download`` twice, with the pins this package ships (``engine/constraints.txt``):

1. torch, from ``--torch-index-url`` when given (the CPU and CUDA builds live on PyTorch's own wheel indexes),
   else from pip's configured index;
2. the geo-r1 wheel (``--wheel FILE``, e.g. what ``make wheel`` built, else ``geo-r1==<this version>`` from
   the index) with ``--extras`` and all its dependencies, finding torch in ``DIR`` first.

It then copies the pins to ``DIR/constraints.txt`` and writes ``DIR/geo-r1-wheelhouse.json``: the geo-r1
version, the torch build, the extras, the Python and platform it was made for, and each file's sha256. The
wheels match the Python and platform that ran the command; ``--pip-arg`` passes pip options through (for
example ``--pip-arg=--python-version=3.12 --pip-arg=--only-binary=:all:`` for another Python).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import subprocess  # nosec B404 (pip, run with an argument list)
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine import __version__
from geo_r1_qgis.core.errors import ConfigError, GeoR1Error

log = logging.getLogger(__name__)

MANIFEST = "geo-r1-wheelhouse.json"
CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"
EXTRAS = ("train",)


class WheelhouseError(GeoR1Error, RuntimeError):
    """``pip download`` failed; the message carries the end of pip's output."""


def _split_extras(text: str | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(e.strip() for e in (text or "").split(",") if e.strip()) if isinstance(text, str) else text


@dataclass(frozen=True)
class WheelhouseConfig:
    out_dir: Path = field(
        metadata={"positional": True, "metavar": "DIR", "help": "the folder to fill with wheels (created)"}
    )
    torch: str = field(
        default="cpu",
        metadata={"choices": ("cpu", "cuda"), "help": "the torch build to download (recorded in the manifest)"},
    )
    torch_index_url: str = field(
        default="", metadata={"help": "the index torch comes from (PyTorch's CPU or CUDA wheel index)"}
    )
    extras: tuple[str, ...] = field(
        default=(),
        metadata={"action": "store", "parse": _split_extras,
                  "help": "comma-separated extras to include, e.g. train"},
    )  # fmt: skip
    wheel: Path | None = field(
        default=None, metadata={"help": "the geo-r1 wheel file (make wheel); default geo-r1 from the package index"}
    )
    constraints: Path = field(default=CONSTRAINTS, metadata={"help": "pins applied to every download"})
    pip_args: tuple[str, ...] = field(
        default_factory=tuple, metadata={"flags": ("--pip-arg",), "help": "an extra option for pip download"}
    )

    def __post_init__(self) -> None:
        if self.torch not in ("cpu", "cuda"):
            raise ConfigError(f"--torch must be cpu or cuda, got {self.torch!r}")
        unknown = sorted(set(self.extras) - set(EXTRAS))
        if unknown:
            raise ConfigError(f"unknown extras {unknown}; this package offers {list(EXTRAS)}")
        if self.wheel is not None and not (self.wheel.is_file() and self.wheel.suffix == ".whl"):
            raise ConfigError(f"--wheel {self.wheel} is not a wheel file; build one with 'make wheel'")
        if not self.constraints.is_file():
            raise ConfigError(f"the pins file {self.constraints} is missing; reinstall geo-r1 or pass --constraints")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"{self.out_dir} exists and is not a folder; choose a folder for the wheels")


def geo_r1_requirement(cfg: WheelhouseConfig) -> str:
    extras = f"[{','.join(cfg.extras)}]" if cfg.extras else ""
    if cfg.wheel is not None:
        return f"geo-r1{extras} @ {cfg.wheel.resolve().as_uri()}"
    return f"geo-r1{extras}=={__version__}"


def download_commands(cfg: WheelhouseConfig) -> list[list[str]]:
    """The two ``pip download`` command lines (argument lists, no shell)."""
    base = [sys.executable, "-m", "pip", "download", "--dest", str(cfg.out_dir), "-c", str(cfg.constraints)]
    torch = [*base, "torch", *cfg.pip_args]
    if cfg.torch_index_url:
        torch += ["--index-url", cfg.torch_index_url]
    rest = [*base, "--find-links", str(cfg.out_dir), geo_r1_requirement(cfg), *cfg.pip_args]
    return [torch, rest]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_wheelhouse(cfg: WheelhouseConfig) -> Path:
    """Download into ``cfg.out_dir`` and write the manifest; returns the manifest's path."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for cmd in download_commands(cfg):
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # nosec B603
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise WheelhouseError(f"pip download failed (exit {proc.returncode}); the last lines:\n{tail}")
    if cfg.wheel is not None and not (cfg.out_dir / cfg.wheel.name).is_file():
        shutil.copy2(cfg.wheel, cfg.out_dir / cfg.wheel.name)
    shutil.copyfile(cfg.constraints, cfg.out_dir / "constraints.txt")
    files = sorted(p for p in cfg.out_dir.iterdir() if p.suffix in (".whl", ".gz", ".zip") and p.is_file())
    manifest = {
        "geo_r1_version": __version__,
        "torch": cfg.torch,
        "torch_index_url": cfg.torch_index_url,
        "extras": list(cfg.extras),
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "files": {p.name: _sha256(p) for p in files},
    }
    out = cfg.out_dir / MANIFEST
    out.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out
