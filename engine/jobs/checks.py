"""The refusals before a job starts, each with its fix, and whether this engine can train at all.

The annotation file is read with :func:`train.dataset.read_annotations` and its rasters opened with
:class:`engine.rasters.RasterioSource` and resolved as ``geo-r1 dataset build`` resolves them, so a job is refused
for the same reasons the build would fail, plus the job's own: a box wholly outside its raster (the build would
skip it quietly) and an expression without val or test boxes (the job's evaluation needs a held-out split).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from geo_r1_qgis.core.annotations import LAYER_NAME
from geo_r1_qgis.core.errors import ConfigError, RasterError

log = logging.getLogger(__name__)

#: what ``POST /jobs`` needs importable in the engine's Python (the ``[train]`` extra)
TRAINING_MODULES = ("trl", "peft", "datasets")
INSTALL_HINT = "pip install 'geo-r1[train]'"


@dataclass(frozen=True)
class AnnotationSummary:
    """What the checks saw: boxes per expression and split, and the rasters."""

    boxes: dict[str, dict[str, int]]
    rasters: tuple[str, ...]


def probe_training(python: str = sys.executable, timeout_s: float = 300.0) -> str | None:
    """None when ``python`` imports the training extras, else the refusal (it names the fix).

    Checked in a child process, so the serving process keeps no broken import: ``trl`` is imported (lazy: a
    fraction of a second), the others only found (importing peft loads torch and transformers: seconds of CPU at
    every engine start; a job whose peft is broken fails with the ImportError in its record instead).
    """
    first, *rest = TRAINING_MODULES
    code = (f"import importlib.util, {first}\n"
            f"for name in {tuple(rest)!r}:\n"
            f"    if importlib.util.find_spec(name) is None:\n"
            f"        raise SystemExit('ModuleNotFoundError: No module named ' + repr(name))\n")  # fmt: skip
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"this engine could not check its training extras ({exc}); {INSTALL_HINT} in its environment"
    if done.returncode == 0:
        return None
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    cause = lines[-1].strip() if lines else f"exit status {done.returncode}"
    return (f"this engine cannot fine-tune: the training extras do not import ({cause}); install them with "
            f"{INSTALL_HINT} in the engine's environment, then restart the engine")  # fmt: skip


def check_annotations(path: Path) -> AnnotationSummary:
    """Refuse (:class:`ConfigError`) an annotation file a job cannot train and evaluate on."""
    import shapely

    from engine.rasters import RasterioSource
    from train.dataset import _resolve_raster, read_annotations, reproject

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"the annotation file {path} does not exist; save the annotation layer first")
    if path.suffix.lower() != ".gpkg":
        raise ConfigError(
            f"{path} is not a GeoPackage; annotations live in a .gpkg with the layer {LAYER_NAME!r} "
            "(the plugin's annotation tool or 'geo-r1 dataset import' writes one)"
        )
    aset = read_annotations(path)
    by_raster = defaultdict(list)
    for f in aset.features:
        by_raster[_resolve_raster(f.annotation.raster, path)].append(f)
    for raster, features in sorted(by_raster.items()):
        try:
            src = RasterioSource(raster)
        except RasterError as exc:
            fids = ", ".join(str(f.fid) for f in features[:5])
            raise ConfigError(
                f"{exc} (named by {len(features)} annotation(s) of {path.name}, features {fids}); restore the raster "
                "or fix the annotations' 'raster' field"
            ) from None
        try:
            geoms = reproject([f.geometry for f in features], aset.crs, src.crs_wkt, f"the annotations of {path}")
            inv = src.transform.inverse()
            outside = []
            for f, geom in zip(features, geoms, strict=True):
                xy = shapely.get_coordinates(geom)
                cols = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c
                rows = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f
                if cols.max() <= 0 or rows.max() <= 0 or cols.min() >= src.width or rows.min() >= src.height:
                    outside.append(str(f.fid))
        finally:
            src.close()
        if outside:
            raise ConfigError(
                f"{len(outside)} annotation(s) of {path.name} lie wholly outside their raster {raster.name} "
                f"(features {', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}); delete them or draw "
                "them on the raster they show"
            )
    boxes: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "val": 0, "test": 0})
    for f in aset.features:
        if not f.annotation.negative:
            boxes[f.annotation.expression][f.annotation.split] += 1
    for expression, counts in sorted(boxes.items()):
        if not counts["val"] and not counts["test"]:
            raise ConfigError(
                f"the expression {expression!r} has no val or test boxes ({counts['train']} train): the job's "
                "automatic evaluation of the base model against the new adapter needs a held-out split. Set the "
                "'split' field of some of its boxes (about one in five, away from the training ones) to val or test"
            )
    return AnnotationSummary({e: dict(c) for e, c in sorted(boxes.items())}, tuple(str(r) for r in sorted(by_raster)))


def check_adapter_dir(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.is_absolute():
        raise ConfigError(f"init_adapter must be an absolute path of an adapter directory, got {path!r}")
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(f"init_adapter {p} holds no adapter_config.json; pass a LoRA adapter directory")
