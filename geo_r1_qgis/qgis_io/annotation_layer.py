"""The annotation GeoPackage from inside QGIS: create or open it, and write it through QGIS's edit buffer.

The layout is :mod:`geo_r1_qgis.core.annotations` (layer ``geo_r1_annotations``, its FIELDS, polygons in
the raster's CRS), the same file ``geo-r1 dataset import`` writes and ``geo-r1 dataset build`` reads. A
missing layer is created with ``osgeo.ogr`` exactly as the command line's writer makes it (strings,
booleans as integers of the boolean subtype); a file that holds the layer with another layout, or that
is not a GeoPackage, is refused and left as it is.

Every change (a box added, a feature deleted or edited, an import) goes through the layer's edit buffer,
so QGIS's Undo (``layer.undoStack()``, Ctrl+Z) takes it back until :meth:`AnnotationStore.save` commits
it to the file; an import or a set of selected polygons is one edit command, undone at once.

QGIS's Python only: PyQGIS, the standard library and ``osgeo``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsFillSymbol,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from ..compat import GEOMETRY_POLYGON, WKT_PREFERRED
from ..core.annotations import FIELDS, LAYER_NAME, Annotation, RasterFrame
from ..core.errors import ConfigError, ExtentError, OutputError, RasterError

__all__ = [
    "LAYER_TITLE",
    "AnnotationFeature",
    "AnnotationStore",
    "check_annotatable",
    "check_layout",
    "create_layer",
    "crs_text",
    "find_raster",
    "plain_value",
    "polygons_to_raster",
    "raster_frame",
    "rect_to_raster",
    "same_crs",
]

log = logging.getLogger(__name__)

#: the annotation layer's name on the map
LAYER_TITLE = "Geo-R1 annotations"


def _ogr() -> tuple[Any, Any, Any]:
    from osgeo import gdal, ogr, osr

    return gdal, ogr, osr


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """``EPSG:32633 (WGS 84 / UTM zone 33N)`` for messages."""
    if not crs.isValid():
        return "no CRS"
    return f"{crs.authid()} ({crs.description()})" if crs.authid() else crs.description() or crs.toProj()


def same_crs(a: QgsCoordinateReferenceSystem, b: QgsCoordinateReferenceSystem) -> bool:
    """Whether two CRSs are the same (a CRS read back from a GeoPackage may lose its authority id, not its meaning)."""
    if a == b:
        return True
    if a.authid() and b.authid():
        return a.authid() == b.authid()
    return a.isValid() and b.isValid() and a.toWkt(WKT_PREFERRED) == b.toWkt(WKT_PREFERRED)


# --------------------------------------------------------------------------------------------------
# The file's layout
# --------------------------------------------------------------------------------------------------


def _foreign(path: Path, why: str) -> OutputError:
    return OutputError(
        f"{path} is not a Geo-R1 annotation file: {why}. It is left as it is; choose another annotation file (a new "
        "name creates one)"
    )


def check_layout(path: str | Path) -> bool:
    """Whether ``path`` already holds the annotation layer (True), or may get one (False: no file yet, or a
    GeoPackage without it). A file of another kind, or an annotation layer of another layout, raises
    :class:`OutputError` naming what differs; nothing is changed."""
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise OutputError(f"the annotation file must be a GeoPackage (a name ending in .gpkg), got {path}")
    if not path.exists():
        return False
    if not path.is_file():
        raise OutputError(f"{path} is a folder; choose a GeoPackage file name ending in .gpkg")
    gdal, ogr, _ = _ogr()
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        try:
            ds = gdal.OpenEx(str(path), gdal.OF_VECTOR)
        except RuntimeError:
            ds = None
        if ds is None:
            raise _foreign(path, "GDAL cannot open it as a vector file")
        if ds.GetDriver().ShortName != "GPKG":
            raise _foreign(path, f"it is a {ds.GetDriver().ShortName} file, not a GeoPackage")
        layer = ds.GetLayerByName(LAYER_NAME)
        if layer is None:
            return False
        problems = []
        geom = ogr.GT_Flatten(layer.GetGeomType())
        if geom not in (ogr.wkbPolygon, ogr.wkbMultiPolygon):
            problems.append(f"its geometries are {ogr.GeometryTypeToName(layer.GetGeomType())}, not polygons")
        defn = layer.GetLayerDefn()
        have = {}
        for i in range(defn.GetFieldCount()):
            f = defn.GetFieldDefn(i)
            have[f.GetName()] = f.GetType()
        missing = [name for name, *_ in FIELDS if name not in have]
        if missing:
            problems.append(f"it lacks the field(s) {', '.join(missing)}")
        want = {"str": (ogr.OFTString,), "bool": (ogr.OFTInteger, ogr.OFTInteger64)}
        wrong = [f"{name} ({ogr.GetFieldTypeName(have[name])}, not {type_})" for name, type_, *_ in FIELDS
                 if name in have and have[name] not in want[type_]]  # fmt: skip
        if wrong:
            problems.append(f"the field(s) {', '.join(wrong)} have another type")
        if layer.GetSpatialRef() is None:
            problems.append("its layer has no CRS")
        if problems:
            raise _foreign(path, f"its layer {LAYER_NAME!r} has another layout ({'; '.join(problems)})")
        return True
    finally:
        ds = None
        gdal.PopErrorHandler()


def create_layer(path: str | Path, crs: QgsCoordinateReferenceSystem) -> None:
    """Create the annotation layer in ``path`` (the GeoPackage is created when missing), in ``crs``, with the
    fields of :data:`~geo_r1_qgis.core.annotations.FIELDS`: what ``geo-r1 dataset import`` makes."""
    path = Path(path)
    if check_layout(path):
        raise OutputError(f"{path} already holds the layer {LAYER_NAME!r}")
    if not crs.isValid():
        raise RasterError("the raster has no CRS, so its annotations could not be placed; set the raster's CRS first")
    gdal, ogr, osr = _ogr()
    srs = osr.SpatialReference()
    try:
        known = bool(crs.authid()) and srs.SetFromUserInput(crs.authid()) == 0
    except RuntimeError:  # an authority GDAL does not know (QGIS's USER:...): its WKT then
        known = False
    if not known:
        srs.ImportFromWkt(crs.toWkt(WKT_PREFERRED))
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    gdal.ErrorReset()
    ds = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                ds = gdal.OpenEx(str(path), gdal.OF_VECTOR | gdal.OF_UPDATE)
            else:
                ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path), options=["VERSION=1.2"])
            if ds is None:
                raise OSError(gdal.GetLastErrorMsg() or "GDAL could not open it for writing")
            layer = ds.CreateLayer(LAYER_NAME, srs, ogr.wkbPolygon)
            if layer is None:
                raise OSError(gdal.GetLastErrorMsg() or "GDAL could not create the layer")
            for name, type_, _, _ in FIELDS:
                fd = ogr.FieldDefn(name, ogr.OFTString if type_ == "str" else ogr.OFTInteger)
                if type_ == "bool":
                    fd.SetSubType(ogr.OFSTBoolean)
                if layer.CreateField(fd) != 0:
                    raise OSError(gdal.GetLastErrorMsg() or f"GDAL could not create the field {name}")
        except (OSError, RuntimeError) as exc:
            raise OutputError(f"cannot create the annotation layer in {path} ({exc}); choose a writable .gpkg "
                              "path") from None  # fmt: skip
    finally:
        ds = None
        gdal.PopErrorHandler()
    log.info("created the annotation layer %s in %s (%s)", LAYER_NAME, path, crs_text(crs))


# --------------------------------------------------------------------------------------------------
# The layer in QGIS
# --------------------------------------------------------------------------------------------------


def plain_value(value: Any) -> Any:
    """A QGIS attribute value as plain Python: NULL (a null QVariant) as None."""
    if value is None or (isinstance(value, QVariant) and value.isNull()):
        return None
    return value


@dataclass(frozen=True)
class AnnotationFeature:
    """One feature of the annotation layer (its fid is negative while it is only in the edit buffer).

    ``annotation`` is None when its attributes break the schema (edited by hand); ``problem`` says how."""

    fid: int
    annotation: Annotation | None
    geometry: QgsGeometry
    problem: str = ""


def _style(layer: QgsVectorLayer) -> None:
    symbol = QgsFillSymbol.createSimple(
        {"color": "0,0,0,0", "outline_color": "255,215,0,255", "outline_width": "0.6", "outline_width_unit": "MM"}
    )
    layer.renderer().setSymbol(symbol)


class AnnotationStore:
    """The annotation layer of one GeoPackage: opened (and added to the project) when first needed."""

    def __init__(self, path: str | Path, project: QgsProject | None = None) -> None:
        self.path = Path(path)
        self.project = project or QgsProject.instance()
        self._layer: QgsVectorLayer | None = None
        check_layout(self.path)  # refuses a foreign file at once, before anything is drawn

    @property
    def uri(self) -> str:
        return f"{self.path}|layername={LAYER_NAME}"

    def _find_loaded(self) -> QgsVectorLayer | None:
        want = str(self.path.resolve())
        for layer in self.project.mapLayers().values():
            if not isinstance(layer, QgsVectorLayer) or layer.providerType() != "ogr":
                continue
            source, _, rest = layer.source().partition("|")
            if rest.replace(" ", "") == f"layername={LAYER_NAME}" and str(Path(source).resolve()) == want:
                return layer
        return None

    def layer(self, crs: QgsCoordinateReferenceSystem | None = None) -> QgsVectorLayer | None:
        """The layer, opened and on the map; created in ``crs`` when the file lacks it (None without ``crs``)."""
        found = self.loaded_layer()
        if found is None:
            if not check_layout(self.path):
                if crs is None:
                    return None
                create_layer(self.path, crs)
            found = QgsVectorLayer(self.uri, LAYER_TITLE, "ogr")
            if not found.isValid():
                raise OutputError(f"QGIS cannot open the annotation layer of {self.path}; check the file")
            _style(found)
            self.project.addMapLayer(found)
        self._layer = found
        return found

    def loaded_layer(self) -> QgsVectorLayer | None:
        """The layer when it is on the map (this store's, or one the user loaded from the file), else None."""
        if self._layer is not None:
            try:
                if self.project.mapLayer(self._layer.id()) is self._layer and self._layer.isValid():
                    return self._layer
            except RuntimeError:  # its C++ object is gone (removed from the project)
                pass
            self._layer = None
        self._layer = self._find_loaded()
        return self._layer

    def _reading_layer(self) -> QgsVectorLayer | None:
        """The layer on the map, else the file's layer opened for reading only (not put on the map: a user who
        removed it from the map is not given it back until the next edit)."""
        layer = self.loaded_layer()
        if layer is not None:
            return layer
        if not check_layout(self.path):
            return None
        layer = QgsVectorLayer(self.uri, LAYER_TITLE, "ogr")
        return layer if layer.isValid() else None

    # -- edits (the edit buffer) --------------------------------------------------------------------
    def _editable(self, crs: QgsCoordinateReferenceSystem) -> QgsVectorLayer:
        layer = self.layer(crs)
        assert layer is not None
        if not same_crs(layer.crs(), crs):
            raise ConfigError(
                f"the annotation file {self.path} holds boxes in {crs_text(layer.crs())}, but this raster is in "
                f"{crs_text(crs)}: annotations are kept in their raster's CRS, one CRS per file. Choose another "
                "annotation file for this raster (the dataset build takes several)"
            )
        if not layer.isEditable() and not layer.startEditing():
            raise OutputError(f"QGIS cannot edit the annotation layer of {self.path} (is the file read-only?)")
        return layer

    def _feature(self, layer: QgsVectorLayer, geometry: QgsGeometry, annotation: Annotation) -> QgsFeature:
        feat = QgsFeature(layer.fields())
        g = QgsGeometry(geometry)
        if QgsWkbTypes.isMultiType(layer.wkbType()):
            g.convertToMultiType()
        else:
            g.convertToSingleType()
        feat.setGeometry(g)
        for name, value in annotation.to_attributes().items():
            feat.setAttribute(name, value)
        return feat

    def add(self, items: Sequence[tuple[QgsGeometry, Annotation]], crs: QgsCoordinateReferenceSystem,
            what: str = "Add annotation") -> list[int]:  # fmt: skip
        """Add polygons (in ``crs``, the raster's) with their annotations, as one undoable edit; returns their
        (temporary) fids."""
        if not items:
            return []
        layer = self._editable(crs)
        layer.beginEditCommand(what)
        added = []
        for geometry, annotation in items:
            feat = self._feature(layer, geometry, annotation)
            if not layer.addFeature(feat):
                layer.destroyEditCommand()
                raise OutputError(f"QGIS refused to add the annotation {annotation.expression!r} to {self.path}")
            added.append(feat.id())
        layer.endEditCommand()
        return added

    def delete(self, fids: Iterable[int]) -> int:
        """Delete features (one undoable edit); returns how many."""
        fids = list(fids)
        layer = self.layer(None)
        if layer is None or not fids:
            return 0
        self._editable(layer.crs())
        layer.beginEditCommand(f"Delete {len(fids)} annotation(s)")
        ok = layer.deleteFeatures(fids)
        layer.endEditCommand()
        if not ok:
            raise OutputError(f"QGIS could not delete the annotation(s) {fids} of {self.path}")
        return len(fids)

    def change(self, fid: int, annotation: Annotation) -> None:
        """Replace one feature's attributes (one undoable edit)."""
        layer = self.layer(None)
        if layer is None:
            raise ConfigError(f"{self.path} holds no annotations yet")
        self._editable(layer.crs())
        fields = layer.fields()
        values = {fields.indexOf(name): value for name, value in annotation.to_attributes().items()}
        layer.beginEditCommand("Edit annotation")
        ok = layer.changeAttributeValues(fid, values)
        layer.endEditCommand()
        if not ok:
            raise OutputError(f"QGIS could not change the annotation {fid} of {self.path}")

    def crs(self) -> QgsCoordinateReferenceSystem | None:
        """The CRS of the file's annotations (None before the first one)."""
        layer = self._reading_layer()
        return QgsCoordinateReferenceSystem(layer.crs()) if layer is not None else None

    def has_unsaved(self) -> bool:
        layer = self._layer
        try:
            return layer is not None and layer.isEditable() and layer.isModified()
        except RuntimeError:
            return False

    def save(self) -> None:
        """Commit the edit buffer to the file (the undo history ends there). A failure keeps every edit in the
        buffer and says why."""
        layer = self._layer
        if layer is None or not layer.isEditable():
            return
        if not layer.commitChanges():
            errors = "; ".join(layer.commitErrors()) or "no reason given"
            raise OutputError(f"the annotations could not be saved to {self.path} ({errors}); they are still in "
                              "the layer's edit buffer: fix the cause (a writable file) and save again")  # fmt: skip
        log.info("saved the annotations to %s", self.path)

    # -- reading ------------------------------------------------------------------------------------
    def features(self) -> list[AnnotationFeature]:
        """Every feature, edit buffer included, in fid order."""
        layer = self._reading_layer()
        if layer is None:
            return []
        names = [f.name() for f in layer.fields()]
        out = []
        for feat in layer.getFeatures(QgsFeatureRequest()):
            values = {n: plain_value(v) for n, v in zip(names, feat.attributes(), strict=False)}
            try:
                ann, problem = Annotation.from_attributes(values, where=f"feature {feat.id()}"), ""
            except ConfigError as exc:
                ann, problem = None, str(exc)
            out.append(AnnotationFeature(int(feat.id()), ann, QgsGeometry(feat.geometry()), problem))
        out.sort(key=lambda f: (f.fid < 0, abs(f.fid)))
        return out

    def expressions(self) -> list[str]:
        """The expressions in the layer, most used first."""
        counts: dict[str, int] = {}
        for f in self.features():
            if f.annotation is not None:
                counts[f.annotation.expression] = counts.get(f.annotation.expression, 0) + 1
        return sorted(counts, key=lambda e: -counts[e])


# --------------------------------------------------------------------------------------------------
# Geometry: into the raster's CRS
# --------------------------------------------------------------------------------------------------


def check_annotatable(raster: Any) -> QgsRasterLayer:
    """The raster to annotate: a valid raster file layer with a CRS (the dataset build reads files)."""
    from .rasters import is_web_layer, layer_kind

    if not isinstance(raster, QgsRasterLayer) or not raster.isValid():
        raise ConfigError("choose the raster to annotate (a raster layer of the project) in the Raster box")
    if is_web_layer(raster):
        raise ConfigError(f"{raster.name()} is a web layer ({layer_kind(raster)}); the dataset build reads raster "
                          "files: save the imagery as a GeoTIFF (Export > Save As...) and annotate that")  # fmt: skip
    if not raster.crs().isValid():
        raise RasterError(f"{raster.name()} has no CRS; set it (Layer Properties > Source) before annotating it")
    return raster


def rect_to_raster(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem, raster: QgsRasterLayer) -> QgsGeometry:
    """A rectangle drawn in ``crs`` (the canvas's) as a box in the raster's CRS: the raster-CRS bounding box of
    the rectangle (edges densified), since the model's boxes are axis-aligned in the raster's pixels."""
    box = QgsRectangle(rect)
    if not same_crs(crs, raster.crs()):
        ct = QgsCoordinateTransform(crs, raster.crs(), QgsProject.instance().transformContext())
        try:
            box = ct.transformBoundingBox(box)
        except Exception as exc:  # QgsCsException
            raise ExtentError(f"the box cannot be placed in the raster's CRS {crs_text(raster.crs())} ({exc}); draw "
                              "it over the raster") from None  # fmt: skip
    return QgsGeometry.fromRect(box)


def polygons_to_raster(
    geometries: Iterable[QgsGeometry], crs: QgsCoordinateReferenceSystem, raster: QgsRasterLayer, what: str
) -> list[QgsGeometry]:
    """Polygons in ``crs`` reprojected vertex by vertex to the raster's CRS, one geometry per polygon part (as
    ``geo-r1 dataset import`` does). Other geometry types are refused."""
    if not crs.isValid():
        raise ConfigError(f"{what} have no CRS, so they cannot be placed on the raster; set the layer's CRS first")
    ct = None
    if not same_crs(crs, raster.crs()):
        ct = QgsCoordinateTransform(crs, raster.crs(), QgsProject.instance().transformContext())
    out = []
    for geometry in geometries:
        if geometry is None or geometry.isNull() or geometry.isEmpty():
            continue
        if geometry.type() != GEOMETRY_POLYGON:
            raise ConfigError(f"{what} are not polygons; annotations are polygons drawn around objects (buffer "
                              "points or lines first)")  # fmt: skip
        g = QgsGeometry(geometry)
        if ct is not None:
            try:
                g.transform(ct)
            except Exception as exc:  # QgsCsException
                raise ExtentError(f"{what} cannot be reprojected from {crs_text(crs)} to the raster's "
                                  f"{crs_text(raster.crs())} ({exc}); check the layer's CRS") from None  # fmt: skip
        out.extend(g.asGeometryCollection() if g.isMultipart() else [g])
    return out


# --------------------------------------------------------------------------------------------------
# The rasters the annotations name, as the checks see them
# --------------------------------------------------------------------------------------------------


def find_raster(source: str, project: QgsProject | None = None) -> QgsRasterLayer | None:
    """The project's raster layer whose source is ``source`` (an annotation's ``raster``), if loaded."""
    project = project or QgsProject.instance()
    for layer in project.mapLayers().values():
        if isinstance(layer, QgsRasterLayer) and layer.source() == source:
            return layer
    return None


def raster_frame(source: str, annotation_file: Path, metres_per_pixel: float | None = None,
                 project: QgsProject | None = None) -> RasterFrame | None:  # fmt: skip
    """The :class:`RasterFrame` of an annotation's raster at ``metres_per_pixel`` (None: native): the loaded
    layer, else the file (relative to the annotation file, as the build resolves it); None when it is gone."""
    from .rasters import is_web_layer, scale_for_resolution

    layer = find_raster(source, project)
    loaded = layer is not None
    if layer is None:
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = annotation_file.parent / path
        if not path.is_file():
            return None
        layer = QgsRasterLayer(str(path), path.stem, "gdal")
        if not layer.isValid():
            return None
    if is_web_layer(layer):
        return None
    try:
        scale = scale_for_resolution(layer, metres_per_pixel or None)
    except (ConfigError, RasterError):  # a CRS without a length unit: the native pixels
        scale = 1.0
    ext = layer.extent()
    return RasterFrame((ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()),
                       ext.width() / layer.width() * scale, ext.height() / layer.height() * scale, loaded)  # fmt: skip
