"""The engine as a wheel: ``make wheel``'s file, its metadata and extras, and ``geo-r1 wheelhouse``.

The wheel is built once per module with the Makefile's own target (``make -o setup wheel``: setup has already
run in ``make test``). Installing it into a fresh venv and serving from it is tested on the plugin's side
(tests/geo_r1_qgis/test_engine_setup.py), through the plugin's installer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from engine import __version__
from engine.cli import TRAIN_EXTRA, missing_extra
from engine.wheelhouse import MANIFEST, WheelhouseConfig, download_commands, geo_r1_requirement
from geo_r1_qgis.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
WHEEL = REPO / "dist" / f"geo_r1-{__version__}-py3-none-any.whl"


@pytest.fixture(scope="module")
def wheel() -> Path:
    proc = subprocess.run(["make", "-s", "-o", "setup", "wheel"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, f"make wheel failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert WHEEL.is_file(), f"make wheel did not write {WHEEL}"
    return WHEEL


def _metadata(wheel: Path) -> tuple[list[str], dict[str, str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(f"geo_r1-{__version__}.dist-info/METADATA").decode()
        entry_points = zf.read(f"geo_r1-{__version__}.dist-info/entry_points.txt").decode()
    return names, {"metadata": meta, "entry_points": entry_points}


def test_wheel_holds_engine_train_recipes_and_core(wheel):
    names, _ = _metadata(wheel)
    # every Python file of the engine, the trainer and the pure core, and every training recipe
    for pkg in ("engine", "train", "geo_r1_qgis/core"):
        for src in (REPO / pkg).rglob("*.py"):
            rel = src.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert rel in names, f"{rel} is missing from the wheel"
    recipes = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "train" / "recipes").rglob("*.yaml"))
    assert recipes and set(recipes) <= set(names)
    # the pins ship as real content (engine/constraints.txt links to the repository's constraints.txt)
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("engine/constraints.txt").decode() == (REPO / "constraints.txt").read_text()
    # the plugin's QGIS-only parts and the tests stay out; the plugin ships as its own zip
    assert not [n for n in names if n.startswith(("tests/", "geo_r1_qgis/engine_control/setup/", "scripts/"))]


def test_wheel_ships_the_plugins_core_only(wheel, tmp_path):
    """Of geo_r1_qgis the wheel holds core/ alone: no QGIS module (panel, plugin, processing_provider, ...) and
    no plugin __init__, so geo_r1_qgis is a namespace there; installed, the core imports and the GUI does not."""
    names, _ = _metadata(wheel)
    plugin = sorted(n for n in names if n.startswith("geo_r1_qgis/") and not n.startswith("geo_r1_qgis/core/"))
    assert plugin == [], f"the wheel ships plugin modules: {plugin}"
    pkg = REPO / "geo_r1_qgis"
    gui = [p.name for p in pkg.rglob("*.py") if "core" not in p.relative_to(pkg).parts]
    assert {"panel.py", "plugin.py", "processing_provider.py"} <= set(gui)  # what the check above keeps out
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(target), str(wheel)], check=True, timeout=300)  # fmt: skip
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import geo_r1_qgis.core.rules.parsing as p, geo_r1_qgis.core.geometry, engine, train\n"
        "assert p.__file__.startswith(sys.argv[1]), p.__file__\n"
        "import importlib.util as u\n"
        "assert u.find_spec('geo_r1_qgis.gui') is None and u.find_spec('geo_r1_qgis.plugin') is None\n"
        "print('ok')\n"
    )
    # -S: neither the venv's site-packages nor its editable install of the repository can answer instead
    out = subprocess.run([sys.executable, "-S", "-c", code, str(target)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_wheel_metadata_base_and_extras(wheel):
    _, meta = _metadata(wheel)
    msg = Parser().parsestr(meta["metadata"])
    requires = msg.get_all("Requires-Dist")
    base = {r.split(";")[0].strip() for r in requires if "extra ==" not in r}
    train = {r.split(";")[0].strip() for r in requires if 'extra == "train"' in r}
    dev = {r.split(";")[0].strip() for r in requires if 'extra == "dev"' in r}
    assert {"torch", "transformers", "peft", "fastapi", "uvicorn", "rasterio", "pyogrio", "pyproj"} <= base
    assert not base & {"trl", "datasets", "matplotlib", "pycocotools", "pytest"}, base
    assert {"trl", "datasets", "matplotlib", "pycocotools", "shapely", "pyyaml"} == train
    assert "geo-r1[train]" in dev and "pytest" in dev
    # geo-r1 ground --ray: an extra of its own, in the test environment, never in the base install
    assert {r.split(";")[0].strip() for r in requires if 'extra == "ray"' in r} == {"ray[data]"}
    assert "geo-r1[ray]" in dev and not any(r.startswith("ray") for r in base), base
    assert set(msg.get_all("Provides-Extra")) == {"train", "ray", "dev"}
    assert msg["Version"] == __version__
    assert "geo-r1 = engine.cli:main" in meta["entry_points"]


def test_train_commands_name_the_extra_they_need():
    # every module TRAIN_EXTRA names is in the [train] extra (so installing it fixes the message)
    extra_modules = {"trl", "datasets", "yaml", "matplotlib", "pycocotools", "shapely"}
    assert {m for mods in TRAIN_EXTRA.values() for m in mods} <= extra_modules
    assert missing_extra("serve") is None and missing_extra("ground") is None
    assert missing_extra("train") is None  # this venv has [dev], hence [train]


def test_version_flag():
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "--version"], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"geo-r1 {__version__}"


def test_wheelhouse_commands(tmp_path, wheel):
    cfg = WheelhouseConfig(out_dir=tmp_path / "wh", extras=("train",), wheel=wheel,
                           torch_index_url="file:///somewhere/torch", pip_args=("--retries", "1"))  # fmt: skip
    torch_cmd, rest = download_commands(cfg)
    assert torch_cmd[1:4] == ["-m", "pip", "download"] and "torch" in torch_cmd
    assert torch_cmd[-2:] == ["--index-url", "file:///somewhere/torch"]
    assert "-c" in torch_cmd and torch_cmd[torch_cmd.index("-c") + 1].endswith("engine/constraints.txt")
    assert geo_r1_requirement(cfg) == f"geo-r1[train] @ {wheel.resolve().as_uri()}"
    assert rest[rest.index("--find-links") + 1] == str(tmp_path / "wh") and rest[-2:] == ["--retries", "1"]
    with pytest.raises(ConfigError, match="cpu or cuda"):
        WheelhouseConfig(out_dir=tmp_path, torch="rocm")
    with pytest.raises(ConfigError, match="unknown extras"):
        WheelhouseConfig(out_dir=tmp_path, extras=("gpu",))
    with pytest.raises(ConfigError, match="make wheel"):
        WheelhouseConfig(out_dir=tmp_path, wheel=tmp_path / "nope.whl")


@pytest.mark.slow
def test_wheelhouse_downloads_everything_the_engine_needs(tmp_path, wheel):
    """A real ``geo-r1 wheelhouse`` from pip's configured index: torch, the wheel and every dependency."""
    out = tmp_path / "wheelhouse"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "wheelhouse", str(out), "--wheel", str(wheel)],
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / MANIFEST).read_text())
    files = manifest["files"]
    assert wheel.name in files and any(f.startswith("torch-2.13.0") for f in files), sorted(files)
    for dist in ("transformers", "fastapi", "uvicorn", "rasterio", "pyogrio", "peft", "accelerate"):
        assert any(f.lower().startswith(dist + "-") for f in files), f"{dist} is missing from {sorted(files)}"
    assert not any(f.lower().startswith("trl-") for f in files), "trl is [train] only"
    assert (out / "constraints.txt").read_text() == (REPO / "constraints.txt").read_text()
    assert manifest["geo_r1_version"] == __version__ and manifest["torch"] == "cpu"
    # every file listed is there, with the sha256 recorded
    import hashlib

    for name, digest in files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
