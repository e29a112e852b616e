"""The plugin package needs nothing beyond QGIS's Python (runs under /usr/bin/python3)."""

import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "geo_r1_qgis"
FORBIDDEN = ("torch", "transformers", "rasterio", "shapely", "pyproj", "peft", "trl", "PIL", "fastapi", "httpx")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_ml_or_gdal_python_imports_anywhere_in_the_plugin(path):
    bad = _imports(path) & set(FORBIDDEN)
    assert not bad, f"{path} imports {bad}: the plugin runs in QGIS's Python (PyQGIS, stdlib, numpy only)"


@pytest.mark.parametrize("path", sorted((PKG / "core").rglob("*.py")), ids=lambda p: p.name)
def test_core_is_pure_no_qgis_no_gdal(path):
    bad = _imports(path) & {"qgis", "osgeo", "PyQt5"}
    assert not bad, f"{path} imports {bad}: geo_r1_qgis/core must run without QGIS and GDAL"


def test_package_imports_under_this_python_without_the_venv():
    code = (
        "import sys, importlib, pkgutil, geo_r1_qgis, geo_r1_qgis.core as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('geo_r1_qgis.core.' + m.name)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert '.venv' not in ''.join(sys.path), sys.path\n"
        "print('ok', sys.executable)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_qgis_plugin_module_imports_with_real_pyqgis():
    pytest.importorskip("qgis.core", reason="needs Debian's python3-qgis (run under /usr/bin/python3)")
    code = "import geo_r1_qgis.plugin as p; assert callable(p.GeoR1Plugin); print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr


def test_metadata_has_every_field_qgis_and_the_plugin_site_need():
    cp = configparser.ConfigParser()
    cp.read(ROOT / "metadata.txt", encoding="utf-8")
    g = cp["general"]
    for key in (
        "name",
        "qgisMinimumVersion",
        "qgisMaximumVersion",
        "description",
        "about",
        "version",
        "author",
        "email",
        "repository",
        "tracker",
        "homepage",
        "tags",
        "category",
        "icon",
        "experimental",
        "hasProcessingProvider",
        "changelog",
    ):
        assert g.get(key), f"metadata.txt lacks {key}"
    assert g["qgisMinimumVersion"] == "3.22"
    # run on 3.22, 3.40 and 3.44; QGIS 4 (Qt6) checked statically only (docs/QGIS4.md), and said so in "about"
    assert g["qgisMaximumVersion"] == "4.99" and g["supportsQt6"] == "True"
    assert "QGIS 4 (Qt6): statically checked, not run" in g["about"]
    assert g["hasProcessingProvider"] == "yes"
    assert (ROOT / "resources" / g["icon"]).is_file()


def test_the_plugin_zip_installs_and_loads_in_qgis(tmp_path):
    """Build the zip, unzip it like QGIS does, and load the plugin from there with real PyQGIS."""
    pytest.importorskip("qgis.core", reason="needs Debian's python3-qgis (run under /usr/bin/python3)")
    import zipfile

    out = tmp_path / "geo_r1_qgis.zip"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "package_plugin.py"), "--out", str(out)], check=True)
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {
            "geo_r1_qgis/metadata.txt",
            "geo_r1_qgis/icon.png",
            "geo_r1_qgis/__init__.py",
            "geo_r1_qgis/core/geometry.py",
            "geo_r1_qgis/processing_provider.py",
        } <= names
        assert all(n.startswith("geo_r1_qgis/") and "__pycache__" not in n for n in names)
        zf.extractall(tmp_path / "plugins")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from qgis.core import QgsApplication\n"
        "app = QgsApplication([], False); app.initQgis()\n"
        "import qgis.utils, geo_r1_qgis\n"
        "assert geo_r1_qgis.__file__.startswith(sys.argv[1]), geo_r1_qgis.__file__\n"
        "meta = qgis.utils.findPlugins(sys.argv[1])\n"
        "name, cp = next(meta)\n"
        "assert name == 'geo_r1_qgis' and cp.get('general', 'name') == 'Geo-R1', name\n"
        "from geo_r1_qgis.processing_provider import GeoR1Provider\n"
        "p = GeoR1Provider(); assert QgsApplication.processingRegistry().addProvider(p)\n"
        "assert QgsApplication.processingRegistry().algorithmById('geor1:ground') is not None\n"
        "assert not p.icon().isNull()\n"
        "QgsApplication.processingRegistry().removeProvider(p)\n"
        "app.exitQgis(); print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "plugins")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
