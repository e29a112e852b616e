"""The Processing provider: ``geor1:ground``, grounding an expression on a raster from the toolbox.

The algorithm fills one :class:`~geo_r1_qgis.core.run_spec.RunSpec` and runs its
:class:`~geo_r1_qgis.core.pipeline.GroundingJob`, reads the raster with
:class:`~geo_r1_qgis.qgis_io.rasters.QgisRasterSource`, asks the engine through
:class:`~geo_r1_qgis.core.client.EngineClient` and writes the merged polygons with
:class:`~geo_r1_qgis.qgis_io.rasters.FeatureSinkResultSink`. ``processAlgorithm`` is the boundary: every
:class:`~geo_r1_qgis.core.errors.GeoR1Error` becomes a ``QgsProcessingException`` there, and nowhere
else.
"""

from __future__ import annotations

import logging
from typing import Any

from qgis.core import (
    QgsFeature,
    QgsGeometry,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingProvider,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication

from .compat import (
    FAST_INSERT,
    FILE_BEHAVIOR_FILE,
    NUMBER_DOUBLE,
    NUMBER_INTEGER,
    SOURCE_VECTOR_POLYGON,
    WKB_MULTIPOLYGON,
    WKB_POLYGON,
)
from .core.client import DEFAULT_URL, EngineClient, default_token_path, engine_capacity, read_token
from .core.errors import EngineRequestError, EngineUnavailableError, GeoR1Error
from .core.geometry import PixelBox, tile_size_advice
from .core.merge import Detection, merge_detections
from .core.pipeline import EnginePool, run_grounding
from .core.progress import ProgressTracker
from .core.results import run_meta
from .core.run_spec import RunSpec
from .engine_control.engine_process import shared_endpoint
from .engine_control.run_task import run_display_name
from .icon import plugin_icon
from .qgis_io.rasters import FeatureSinkResultSink, features_area, make_fields, parse_bands, prepare_input
from .settings import PluginSettings

log = logging.getLogger(__name__)

MODES = ("one", "all")
#: what a toolbox search should find the algorithms by
TAGS = ("detect", "detection", "find", "object", "search", "grounding", "referring expression",
        "vision language model", "geo-r1", "qwen")  # fmt: skip
#: how long the algorithm waits for the engine's /health before giving up (seconds)
ENGINE_READY_TIMEOUT_S = 5.0


class _ResultStyler(QgsProcessingLayerPostProcessorInterface):
    """Gives a loaded ``geor1:ground`` output the Geo-R1 look (score ramp, labels, map tip, form widgets).

    One instance for the session: Processing keeps only a pointer, used after the algorithm's copy is gone."""

    _instance: _ResultStyler | None = None

    @classmethod
    def shared(cls) -> _ResultStyler:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def postProcessLayer(self, layer, context, feedback) -> None:
        if isinstance(layer, QgsVectorLayer):
            from .qgis_io.results_style import style_result_layer

            style_result_layer(layer)


def _tr(text: str) -> str:
    return QCoreApplication.translate("GeoR1", text)


class GroundExpressionAlgorithm(QgsProcessingAlgorithm):
    """``geor1:ground``: find what a referring expression describes on a raster, as polygons."""

    INPUT = "INPUT"
    EXPRESSION = "EXPRESSION"
    MODE = "MODE"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    GROUND_RESOLUTION = "GROUND_RESOLUTION"
    AREA = "AREA"
    ENGINE_URL = "ENGINE_URL"
    TOKEN_FILE = "TOKEN_FILE"
    MAX_NEW_TOKENS = "MAX_NEW_TOKENS"
    OUTLINES = "OUTLINES"
    OUTPUT = "OUTPUT"
    OUTLINE_OUTPUT = "OUTLINE_OUTPUT"
    #: the OUTLINES choices: (RunSpec.task, RunSpec.outline)
    OUTLINE_CHOICES = (("auto", False), ("auto", True), ("gres", False))

    # -- identity ---------------------------------------------------------------------------------
    def name(self) -> str:
        return "ground"

    def displayName(self) -> str:
        return _tr("Ground an expression on a raster")

    def group(self) -> str:
        return _tr("Grounding")

    def groupId(self) -> str:
        return "grounding"

    def createInstance(self) -> GroundExpressionAlgorithm:
        return GroundExpressionAlgorithm()

    def tags(self) -> list[str]:
        return [_tr(t) for t in TAGS]

    def icon(self):
        return plugin_icon()

    def shortHelpString(self) -> str:
        return _tr(
            "<p>Finds what a referring expression describes (e.g. <i>all storage tanks</i>, <i>the largest "
            "building next to the river</i>) on a georeferenced raster with a Geo-R1 model, and returns one "
            "polygon per object, in the raster's CRS.</p>"
            "<p><b>The engine.</b> The model runs in a separate process, the Geo-R1 engine, which must be "
            f"started first: from the Geo-R1 panel's engine line (Start), or in a terminal with <code>geo-r1 serve "
            "--model &lt;model id or directory&gt;</code>. The algorithm uses the engine URL and token file of "
            f"the plugin's settings (Raster › Geo-R1 › Settings; by default {DEFAULT_URL} and "
            f"<code>{default_token_path()}</code>) unless <i>Engine URL</i> and <i>Token file</i> are given.</p>"
            "<p><b>Parameters.</b> <i>Expression</i>: what to find. <i>Mode</i>: <b>all</b> returns every "
            "instance; <b>one</b> only the single best match (large rasters are searched coarse to fine). "
            "<i>Tile size</i> and <i>Overlap</i>: the raster is cut into tiles of this many pixels that overlap "
            "by this many pixels; objects found twice in overlaps are merged. <i>Bands</i>: three band numbers "
            "for R,G,B (or one, shown as grey), e.g. <code>4,3,2</code>; by default the red, green and blue "
            "bands, else the first three, else band 1. Non-8-bit data is stretched from its 2nd to its 98th "
            "percentile; nodata, NaN and alpha are respected and tiles with no valid pixel are skipped. "
            "<i>Extent</i>: only this part of the raster. <i>Ground resolution</i>: metres per pixel the model "
            "sees (0: the raster's own); e.g. 0.3 on a 0.1 m orthophoto reads it averaged to 0.3 m. <i>Area</i>: "
            "polygons to search in (tick <i>Selected features only</i> for the selection): only tiles that touch "
            "them are asked, and objects whose centre lies outside them are dropped. Web layers (XYZ, WMS, WMTS) "
            "are read at the ground resolution (0: the layer's finest zoom level) over the extent or the "
            "polygons, one of which is then needed. <i>Engine URL</i> and <i>Token file</i>: where the "
            "engine runs and its token. <i>Max new tokens</i>: how long the model may reason per tile.</p>"
            "<p><b>Output.</b> Each feature stores the expression, mode, score (box confidence × presence), "
            "presence, label, the model's <b>reasoning</b> for its tile, the model, adapter and prompt version, "
            "the tile id, the run id, the creation time and whether the box was assembled from pieces cut by "
            "tile edges (truncated). Processing does not resume an interrupted run; <code>geo-r1 ground "
            "--resume</code> on the command line does.</p>"
        )

    # -- parameters -------------------------------------------------------------------------------
    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:
        defaults = PluginSettings.load()  # the settings dialog's tile size, overlap and max new tokens
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, _tr("Raster")))
        self.addParameter(QgsProcessingParameterString(self.EXPRESSION, _tr("Expression (what to find)")))
        self.addParameter(
            QgsProcessingParameterEnum(
                self.MODE,
                _tr("Mode"),
                options=[_tr("one (best match)"), _tr("all (every instance)")],
                defaultValue=1,
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.TILE_SIZE,
                _tr("Tile size (pixels; 0: the tile the model serves)"),
                NUMBER_INTEGER,
                defaults.tile_size,
                minValue=0,
                maxValue=4096,
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.OVERLAP,
                _tr("Tile overlap (pixels)"),
                NUMBER_INTEGER,
                defaults.overlap,
                minValue=0,
                maxValue=2048,
            )
        )
        self.addParameter(
            QgsProcessingParameterString(
                self.BANDS, _tr("Bands as R,G,B (e.g. 1,2,3; empty: automatic)"), optional=True
            )
        )
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, _tr("Extent (empty: whole raster)"), optional=True))
        self.addParameter(
            QgsProcessingParameterNumber(
                self.GROUND_RESOLUTION,
                _tr("Ground resolution (metres per pixel; 0: the raster's own)"),
                NUMBER_DOUBLE,
                0.0,
                minValue=0.0,
            )
        )
        self.addParameter(
            QgsProcessingParameterFeatureSource(
                self.AREA,
                _tr("Area: search only inside these polygons (optional)"),
                [SOURCE_VECTOR_POLYGON],
                optional=True,
            )
        )
        # The engine comes from the plugin's settings unless a model or a call names another one: the
        # defaults are empty, so a saved model follows the settings instead of a URL baked into it.
        self.addParameter(
            QgsProcessingParameterString(
                self.ENGINE_URL, _tr("Engine URL (empty: the plugin's settings)"), defaultValue="", optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterFile(
                self.TOKEN_FILE,
                _tr("Engine token file (empty: the plugin's settings)"),
                behavior=FILE_BEHAVIOR_FILE,
                defaultValue=None,
                optional=True,
                fileFilter="All files (*)",  # the default filter (*.*) rejects a name without an extension
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.MAX_NEW_TOKENS,
                _tr("Max new tokens per tile (0: Geo-R1's, 256 for one, 1024 for all)"),
                NUMBER_INTEGER,
                defaults.max_new_tokens,
                minValue=0,
                maxValue=4096,
            )
        )
        self.addParameter(
            QgsProcessingParameterEnum(
                self.OUTLINES,
                _tr("Outlines (the engine's SAM: geo-r1 serve --sam)"),
                options=[_tr("none: boxes only"), _tr("refine each box to its outline"),
                         _tr("GRES: boxes and keypoints, then SAM (mode all)")],
                defaultValue=0,
            )
        )  # fmt: skip
        self.addParameter(
            QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Grounded objects"), SOURCE_VECTOR_POLYGON)
        )
        self.addParameter(
            QgsProcessingParameterFeatureSink(
                self.OUTLINE_OUTPUT, _tr("Outlines (with an Outlines choice)"), SOURCE_VECTOR_POLYGON,
                optional=True, createByDefault=False,
            )
        )  # fmt: skip

    # -- running ----------------------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback) -> dict[str, Any]:
        try:
            return self._run(parameters, context, feedback)
        except GeoR1Error as exc:  # the boundary: every project error becomes a Processing error
            raise QgsProcessingException(str(exc)) from None

    def _run(self, parameters, context, feedback) -> dict[str, Any]:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(_tr("the INPUT raster layer could not be loaded; check the layer or path"))
        expression = self.parameterAsString(parameters, self.EXPRESSION, context)
        mode = MODES[self.parameterAsEnum(parameters, self.MODE, context)]
        bands = parse_bands(self.parameterAsString(parameters, self.BANDS, context))
        settings = PluginSettings.load()
        # left empty: the engine the plugin started while it runs (the panel's), else the settings' engine
        shared_url, shared_token = shared_endpoint(settings)
        url = self.parameterAsString(parameters, self.ENGINE_URL, context).strip() or shared_url
        token_file = self.parameterAsFile(parameters, self.TOKEN_FILE, context) or str(shared_token)

        extent = None
        if parameters.get(self.EXTENT) not in (None, ""):
            extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        area = None
        if parameters.get(self.AREA) not in (None, ""):
            polygons = self.parameterAsSource(parameters, self.AREA, context)
            if polygons is None:
                raise QgsProcessingException(self.invalidSourceError(parameters, self.AREA))
            area = features_area(polygons.getFeatures(), polygons.sourceCrs(), name="the AREA polygons")
        inputs = prepare_input(
            layer,
            bands=bands,
            extent=extent,
            metres_per_pixel=self.parameterAsDouble(parameters, self.GROUND_RESOLUTION, context) or None,
            area=area,
            context=context.transformContext(),
        )
        source = inputs.source
        task, outline = self.OUTLINE_CHOICES[self.parameterAsEnum(parameters, self.OUTLINES, context)]
        spec = RunSpec(
            expression=expression,
            mode=mode,
            task=task,
            outline=outline,
            max_new_tokens=self.parameterAsInt(parameters, self.MAX_NEW_TOKENS, context) or None,
            tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context) or None,
            overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
            in_flight=settings.in_flight or None,  # the plugin's "Tiles in flight" (0: what the engine takes)
        )

        client = EngineClient(url, read_token(token_file))
        try:
            info = client.wait_until_ready(total_timeout_s=ENGINE_READY_TIMEOUT_S)
        except EngineUnavailableError as exc:
            raise QgsProcessingException(
                f"the Geo-R1 engine is not running at {url}: {exc}. Start it with Start in the Geo-R1 panel's "
                "engine line, or in a terminal with `geo-r1 serve --model <model id or directory>` (add --port "
                "and --token-file to match the plugin's settings or ENGINE_URL and TOKEN_FILE), then run this "
                "algorithm again"
            ) from None
        except EngineRequestError as exc:
            hint = (
                f"the token in {token_file or default_token_path()} is not the engine's: set TOKEN_FILE to the "
                "file the engine was started with (--token-file)"
                if exc.status == 401
                else "check ENGINE_URL"
            )
            raise QgsProcessingException(f"the Geo-R1 engine at {url} refused the request: {exc}; {hint}") from None
        spec = spec.with_engine_tile(info)  # no tile chosen (0): the one the model serves
        advice = tile_size_advice(spec.tile)
        if advice:
            feedback.pushWarning(advice)
        job = spec.job(scale=inputs.scale, window=inputs.window, area_polygons=inputs.area_polygons)
        feedback.pushInfo(
            f"engine {info.get('engine_version', '?')} at {url}: model {info.get('model')}, adapter "
            f"{info.get('adapter') or 'none'}, prompts {info.get('prompt_version')}"
        )
        feedback.pushInfo(f"raster {source.name}: {source.describe()}")
        feedback.pushInfo(
            f"read at {inputs.units_per_pixel:.6g} map units per pixel (scale {inputs.scale:.4g}); "
            f"{len(inputs.area_polygons or ())} area polygon part(s)"
        )

        fields = make_fields()
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, WKB_POLYGON, layer.crs())
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        outline_sink, outline_id = None, None
        if job.outlines:
            outline_sink, outline_id = self.parameterAsSink(
                parameters, self.OUTLINE_OUTPUT, context, fields, WKB_MULTIPOLYGON, layer.crs()
            )
            if outline_sink is None:
                feedback.pushWarning(_tr("no OUTLINE_OUTPUT was chosen: the outlines are not kept"))
        result_sink = FeatureSinkResultSink(sink, run_meta(expression, mode, info), outline_sink=outline_sink)

        tracker = ProgressTracker(job)  # one 0-100 % over both passes of mode "one", as the panel shows it

        def progress(done: int, total: int, phase: str) -> None:
            feedback.setProgress(tracker.percent(done, total, phase))
            feedback.setProgressText(f"{phase}: tile {done} of {total}")

        engines = EnginePool.of(client, engine_capacity(info))  # tiles in flight: what /info says, unless set
        summary = run_grounding(job, source, result_sink, engines, progress=progress, is_canceled=feedback.isCanceled)
        feedback.pushInfo(
            f"{summary.status}: {summary.detections_final} object(s) from {summary.tiles_processed} tile(s) "
            f"({summary.tiles_skipped} nodata tile(s) skipped, {summary.requests} request(s), strategy "
            f"{summary.strategy}, {summary.parse_failures} unparsed answer(s)) in {summary.seconds:.1f} s "
            f"(engine {summary.engine_s:.1f} s, reading {summary.read_s:.1f} s); run {result_sink.run_id}"
        )
        if summary.status == "canceled":
            feedback.reportError(_tr("canceled: nothing was written (Processing does not resume a run)"))
        feedback.setProgress(100.0)
        if context.willLoadLayerOnCompletion(dest_id):  # named after what was asked, styled as the panel's layers
            details = context.layerToLoadOnCompletionDetails(dest_id)
            details.name = run_display_name(expression, mode, raster=layer.name())
            details.setPostProcessor(_ResultStyler.shared())
        if outline_id is not None and context.willLoadLayerOnCompletion(outline_id):
            details = context.layerToLoadOnCompletionDetails(outline_id)
            details.name = run_display_name(expression, mode, raster=layer.name()) + " " + _tr("(outlines)")
        out = {self.OUTPUT: dest_id}
        if outline_id is not None:
            out[self.OUTLINE_OUTPUT] = outline_id
        return out


class FilterDetectionsAlgorithm(QgsProcessingAlgorithm):
    """``geor1:filter``: drop weak detections of a Geo-R1 result layer and merge duplicates, with core/merge.py."""

    INPUT = "INPUT"
    MIN_SCORE = "MIN_SCORE"
    IOU = "IOU"
    CONTAINMENT = "CONTAINMENT"
    OUTPUT = "OUTPUT"

    def name(self) -> str:
        return "filter"

    def displayName(self) -> str:
        return _tr("Filter and merge detections")

    def group(self) -> str:
        return _tr("Grounding")

    def groupId(self) -> str:
        return "grounding"

    def tags(self) -> list[str]:
        return [_tr(t) for t in (*TAGS, "filter", "merge", "threshold", "score")]

    def icon(self):
        return plugin_icon()

    def createInstance(self) -> FilterDetectionsAlgorithm:
        return FilterDetectionsAlgorithm()

    def shortHelpString(self) -> str:
        return _tr(
            "<p>Keeps the detections of a Geo-R1 result layer whose <i>score</i> is at least the minimum, and merges "
            "those that are the same object (the same rule as the grounding run's merge across tiles: IoU at least "
            "the threshold, or one box mostly inside another), keeping the best-scored one. Boxes are compared by "
            "their bounding rectangles in the layer's CRS. Fields are kept as they are.</p>"
        )

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:
        self.addParameter(QgsProcessingParameterFeatureSource(self.INPUT, _tr("Geo-R1 result layer"),
                                                              [SOURCE_VECTOR_POLYGON]))  # fmt: skip
        self.addParameter(QgsProcessingParameterNumber(self.MIN_SCORE, _tr("Minimum score"), NUMBER_DOUBLE, 0.0,
                                                       minValue=0.0, maxValue=1.0))  # fmt: skip
        self.addParameter(QgsProcessingParameterNumber(self.IOU, _tr("Merge when IoU is at least"), NUMBER_DOUBLE,
                                                       0.5, minValue=0.01, maxValue=1.0))  # fmt: skip
        self.addParameter(QgsProcessingParameterNumber(self.CONTAINMENT, _tr("Merge when this share of the smaller "
                                                       "box is inside the other"), NUMBER_DOUBLE, 0.7, minValue=0.01,
                                                       maxValue=1.0))  # fmt: skip
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Filtered detections"),
                                                            SOURCE_VECTOR_POLYGON))  # fmt: skip

    def processAlgorithm(self, parameters, context, feedback) -> dict[str, Any]:
        try:
            return self._run(parameters, context, feedback)
        except GeoR1Error as exc:  # the boundary
            raise QgsProcessingException(str(exc)) from None

    def _run(self, parameters, context, feedback) -> dict[str, Any]:
        source = self.parameterAsSource(parameters, self.INPUT, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, self.INPUT))
        fields = source.fields()
        score_at = fields.indexOf("score")
        if score_at < 0:
            raise QgsProcessingException(_tr("the layer has no 'score' field: pick a layer written by Geo-R1"))
        min_score = self.parameterAsDouble(parameters, self.MIN_SCORE, context)
        kept: dict[tuple[float, float, float, float], QgsFeature] = {}
        dets = []
        for f in source.getFeatures():
            score = f.attribute(score_at)
            if f.geometry().isEmpty() or score is None or float(score) < min_score:
                continue
            r = f.geometry().boundingBox()
            if not (r.width() > 0 and r.height() > 0):
                continue
            box = PixelBox(r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum())
            kept.setdefault((box.x1, box.y1, box.x2, box.y2), f)
            dets.append(Detection(box=box, score=float(score)))
        iou = self.parameterAsDouble(parameters, self.IOU, context)
        containment = self.parameterAsDouble(parameters, self.CONTAINMENT, context)
        merged = merge_detections(dets, iou, containment, gap_tol_px=0.0)
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, WKB_POLYGON,
                                             source.sourceCrs())  # fmt: skip
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        out = []
        for d in merged:
            original = kept.get((d.box.x1, d.box.y1, d.box.x2, d.box.y2))
            feature = QgsFeature(fields)
            if original is not None:
                feature.setAttributes(original.attributes())
                feature.setGeometry(original.geometry())
            else:  # pieces of one object: their bounding rectangle
                feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(d.box.x1, d.box.y1, d.box.x2, d.box.y2)))
            feature.setAttribute(score_at, d.score)
            out.append(feature)
        sink.addFeatures(out, FAST_INSERT)
        feedback.pushInfo(f"{len(out)} detection(s) kept of {source.featureCount()}")
        return {self.OUTPUT: dest_id}


class GeoR1Provider(QgsProcessingProvider):
    """The "Geo-R1" group of the Processing toolbox."""

    def id(self) -> str:
        return "geor1"

    def name(self) -> str:
        return "Geo-R1"

    def longName(self) -> str:
        return "Geo-R1 reasoning-first grounding"

    def icon(self):
        return plugin_icon()

    def loadAlgorithms(self) -> None:
        self.addAlgorithm(GroundExpressionAlgorithm())
        self.addAlgorithm(FilterDetectionsAlgorithm())
