"""Tests of geo_r1_qgis/core/pipeline.py: the whole-raster run loop, pure (runs under both Pythons).

The raster is an in-memory numpy array; the "engine" is a scripted client that really looks at the
tile images it is sent: every object is painted as a rectangle of its own colour, and the client
answers with the tight box of each colour it sees. So a box placed at known raster pixels must come
out at known map coordinates whatever the tiling, scale or pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from geo_r1_qgis.core.client import Box, GroundResult, TileImage
from geo_r1_qgis.core.errors import ConfigError, EmptyRasterError
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile, box_to_polygon
from geo_r1_qgis.core.merge import Detection
from geo_r1_qgis.core.pipeline import (
    GroundingJob,
    MapDetection,
    RunSummary,
    coarse_scale,
    grid_size_hint,
    plan_full,
    result_to_detections,
    run_grounding,
)

# -- fakes -------------------------------------------------------------------------------------------


class ArraySource:
    """A raster in memory: (H, W, 3) uint8, nearest-neighbour resampling, an optional validity mask."""

    def __init__(self, rgb: np.ndarray, transform: Affine, valid: np.ndarray | None = None) -> None:
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]
        self.transform = transform
        self.crs_wkt = 'LOCAL_CS["test"]'
        self.valid = np.ones(rgb.shape[:2], bool) if valid is None else valid
        self.reads = 0

    def read(self, tile: Tile) -> tuple[np.ndarray, float]:
        self.reads += 1
        w, h = tile.size
        win = tile.window
        cols = np.clip((win.x1 + (np.arange(w) + 0.5) * win.width / w).astype(int), 0, self.width - 1)
        rows = np.clip((win.y1 + (np.arange(h) + 0.5) * win.height / h).astype(int), 0, self.height - 1)
        img = self.rgb[rows][:, cols].copy()
        ok = self.valid[rows][:, cols]
        img[~ok] = 0
        return img, float(ok.mean())


class ColourClient:
    """Finds every painted object: red channel = object id (1..255), green = its score × 255."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def ground(self, tiles, expression, task="multi", reasoning=True, max_new_tokens=256):
        self.calls.append((len(tiles), task))
        out = []
        for t in tiles:
            img = np.frombuffer(t.rgb, np.uint8).reshape(t.height, t.width, 3)
            boxes = []
            for k in np.unique(img[..., 0]):
                if k == 0:
                    continue
                ys, xs = np.nonzero(img[..., 0] == k)
                score = float(img[ys[0], xs[0], 1]) / 255.0
                boxes.append(
                    Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), score, "obj")
                )
            boxes.sort(key=lambda b: -b.score)
            if task == "rec":
                boxes = boxes[:1]
            out.append(
                GroundResult(
                    boxes=tuple(boxes),
                    presence=1.0 if boxes else 0.05,
                    reasoning="I look for coloured rectangles.",
                    raw_text="",
                    parse_status="ok",
                    timings_ms={"generate": 1.0},
                )
            )
        return out


class RecordingSink:
    def __init__(self, done: dict[str, list[Detection]] | None = None) -> None:
        self.tiles: dict[str, tuple[str, list[MapDetection]]] = {}
        self.final: list[MapDetection] | None = None
        self._done = done or {}
        self.commits = 0

    def done_tiles(self):
        return self._done

    def write_tile(self, tile_id, tile, detections, status):
        assert tile_id not in self.tiles, f"tile {tile_id} written twice"
        self.tiles[tile_id] = (status, list(detections))

    def commit(self):
        self.commits += 1

    def finish(self, final, summary):
        self.final = list(final)

    def detections(self) -> dict[str, list[Detection]]:
        return {k: [m.detection for m in dets] for k, (_, dets) in self.tiles.items()}


def paint(width: int, height: int, objects: list[tuple[int, int, int, int, float]]) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 2] = 40  # background
    for k, (x1, y1, x2, y2, score) in enumerate(objects, start=1):
        rgb[y1:y2, x1:x2, 0] = k
        rgb[y1:y2, x1:x2, 1] = round(score * 255)
    return rgb


# -- transforms of the evidence: UTM, EPSG:4326, EPSG:3857, rotated ----------------------------------

TRANSFORMS = {
    "utm": (Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_200_000.0), 0.01),
    "epsg4326": (Affine(1e-5, 0.0, 7.5, 0.0, -1e-5, 46.9), 1e-9),
    "epsg3857": (Affine(0.3, 0.0, 834_000.0, 0.0, -0.3, 5_930_000.0), 0.01),
    "rotated": (Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_200_000.0) * Affine.rotation(17.0), 0.01),
}

OBJECTS = [
    (30, 40, 70, 80, 0.9),  # inside the first tile
    (100, 20, 140, 60, 0.8),  # cut by the first tile's right edge, whole in the second
    (200, 210, 250, 235, 0.7),  # in the overlap of four tiles
    (10, 300, 40, 330, 0.6),  # bottom edge tiles
]


def _ring_close(a, b, tol: float) -> bool:
    return all(
        math.isclose(p[0], q[0], abs_tol=tol) and math.isclose(p[1], q[1], abs_tol=tol)
        for p, q in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_boxes_at_known_pixels_come_out_at_known_map_coords(name):
    transform, tol = TRANSFORMS[name]
    source = ArraySource(paint(333, 345, OBJECTS), transform)
    sink = RecordingSink()
    job = GroundingJob("coloured rectangles", mode="all", tile_size=128, overlap=32, batch_size=3)
    summary = run_grounding(job, source, sink, ColourClient())
    assert summary.status == "done"
    assert summary.tiles_total == grid_size_hint(333, 345, job) == len(sink.tiles)
    assert sink.final is not None and len(sink.final) == len(OBJECTS)
    got = sorted(sink.final, key=lambda m: -m.detection.score)
    for m, (x1, y1, x2, y2, score) in zip(got, OBJECTS, strict=True):
        assert m.detection.box == PixelBox(x1, y1, x2, y2)
        assert m.detection.score == pytest.approx(round(score * 255) / 255)
        assert _ring_close(m.ring, box_to_polygon(PixelBox(x1, y1, x2, y2), transform), tol)
        # The corner (x1, y1) by hand through the full affine (rotation included).
        a = transform
        assert m.ring[0][0] == pytest.approx(a.a * x1 + a.b * y1 + a.c, abs=tol)
        assert m.ring[0][1] == pytest.approx(a.d * x1 + a.e * y1 + a.f, abs=tol)


def test_a_box_cut_by_a_tile_edge_is_kept_once_and_whole():
    source = ArraySource(paint(240, 128, [(100, 20, 140, 60, 0.8)]), Affine.identity())
    sink = RecordingSink()
    job = GroundingJob("x", mode="all", tile_size=128, overlap=32)
    run_grounding(job, source, sink, ColourClient())
    per_tile = sink.detections()
    assert [d.truncated for d in per_tile["r0c0"]] == [True]  # cut at x=128 by the first tile's edge
    assert per_tile["r0c0"][0].box == PixelBox(100, 20, 128, 60)
    assert [d.box for d in per_tile["r0c1"]] == [PixelBox(100, 20, 140, 60)]
    assert [m.detection.box for m in sink.final] == [PixelBox(100, 20, 140, 60)]
    assert sink.final[0].detection.tile_id == "r0c1"


def test_an_object_larger_than_the_overlap_is_assembled_from_its_pieces():
    source = ArraySource(paint(240, 100, [(60, 10, 180, 50, 0.9)]), Affine.identity())
    sink = RecordingSink()
    run_grounding(GroundingJob("x", mode="all", tile_size=128, overlap=16), source, sink, ColourClient())
    assert [m.detection.box for m in sink.final] == [PixelBox(60, 10, 180, 50)]
    assert sink.final[0].detection.truncated


def test_mode_one_returns_the_best_and_asks_rec():
    source = ArraySource(paint(333, 345, OBJECTS), Affine.identity())
    client, sink = ColourClient(), RecordingSink()
    summary = run_grounding(GroundingJob("x", mode="one", tile_size=128, overlap=32), source, sink, client)
    assert summary.strategy == "full"
    assert [m.detection.box for m in sink.final] == [PixelBox(30, 40, 70, 80)]
    assert {task for _, task in client.calls} == {"rec"}


def test_score_is_box_score_times_presence():
    tile = Tile(0, 0, 0, PixelBox(0, 0, 100, 100), (100, 100), Affine.identity())
    result = GroundResult((Box(10, 10, 20, 20, 0.5, "a"), Box(-5, -5, -1, -1, 0.9)), 0.4, "why", "", "ok")
    (det,) = result_to_detections(result, "r0c0", tile, 100, 100, PixelBox(0, 0, 100, 100))
    assert det.score == pytest.approx(0.2)
    assert det.presence == pytest.approx(0.4)
    assert det.reasoning == "why"


def test_scale_resamples_and_boxes_stay_in_raster_pixels():
    source = ArraySource(paint(400, 400, [(100, 100, 160, 140, 0.9)]), Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0))
    sink = RecordingSink()
    job = GroundingJob("x", mode="all", tile_size=100, overlap=10, scale=2.0)
    summary = run_grounding(job, source, sink, ColourClient())
    assert summary.tiles_total == 9  # 200 raster px per tile, 180 px stride: 3 x 3 over 400 px
    (m,) = sink.final
    assert m.detection.box == PixelBox(100, 100, 160, 140)
    assert m.ring[0] == pytest.approx((1200.0, 4800.0))


def test_tiles_without_valid_pixels_are_skipped_not_sent():
    rgb = paint(256, 128, [(20, 20, 40, 40, 0.9)])
    valid = np.ones((128, 256), bool)
    valid[:, 128:] = False
    source = ArraySource(rgb, Affine.identity(), valid)
    client, sink = ColourClient(), RecordingSink()
    summary = run_grounding(GroundingJob("x", mode="all", tile_size=128, overlap=0), source, sink, client)
    assert summary.tiles_skipped == 1
    assert sink.tiles["r0c1"][0] == "skipped"
    assert sum(n for n, _ in client.calls) == 1


def test_all_nodata_area_is_an_error():
    source = ArraySource(paint(64, 64, []), Affine.identity(), np.zeros((64, 64), bool))
    with pytest.raises(EmptyRasterError, match="nodata"):
        run_grounding(GroundingJob("x", tile_size=32, overlap=0), source, RecordingSink(), ColourClient())


def test_batches_respect_batch_size():
    source = ArraySource(paint(300, 300, OBJECTS), Affine.identity())
    client = ColourClient()
    run_grounding(GroundingJob("x", tile_size=64, overlap=0, batch_size=4), source, RecordingSink(), client)
    sizes = [n for n, _ in client.calls]
    assert sum(sizes) == 25 and max(sizes) == 4


def test_window_limits_the_area():
    source = ArraySource(paint(333, 345, OBJECTS), Affine.identity())
    sink = RecordingSink()
    job = GroundingJob("x", mode="all", tile_size=128, overlap=0, window=PixelBox(0, 0, 128, 128))
    run_grounding(job, source, sink, ColourClient())
    assert list(sink.tiles) == ["r0c0"]
    assert {m.detection.box for m in sink.final} == {PixelBox(30, 40, 70, 80), PixelBox(100, 20, 128, 60)}


def test_cancel_stops_and_resume_completes_without_duplicates():
    source = ArraySource(paint(333, 345, OBJECTS), Affine.identity())
    job = GroundingJob("x", mode="all", tile_size=128, overlap=32, batch_size=2)
    first = RecordingSink()

    def cancel_after_some() -> bool:  # once some tiles are written (requests run in worker threads)
        return len(first.tiles) >= 3

    summary = run_grounding(job, source, first, ColourClient(), is_canceled=cancel_after_some)
    assert summary.status == "canceled" and first.final is None
    assert 0 < len(first.tiles) < summary.tiles_total
    second = RecordingSink(done=first.detections())
    source.reads = 0
    summary2 = run_grounding(job, source, second, ColourClient())
    assert summary2.tiles_resumed == len(first.tiles)
    assert source.reads == summary2.tiles_total - summary2.tiles_resumed
    assert not set(first.tiles) & set(second.tiles)
    assert len(second.final) == len(OBJECTS)


def test_cancel_does_not_wait_for_the_request_in_flight():
    import threading

    class SlowClient(ColourClient):
        """Answers the first request at once; the second stays in flight until released."""

        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.started = 0
            self.second_finished = False

        def ground(self, tiles, *args, **kwargs):
            self.started += 1
            if self.started > 1:
                self.release.wait(30)
                self.second_finished = True
            return super().ground(tiles, *args, **kwargs)

    source = ArraySource(paint(333, 345, OBJECTS), Affine.identity())
    job = GroundingJob("x", mode="all", tile_size=128, overlap=32, batch_size=2)
    client, sink = SlowClient(), RecordingSink()
    summary = run_grounding(job, source, sink, client, is_canceled=lambda: len(sink.tiles) >= 2)
    try:
        assert summary.status == "canceled"
        assert not client.second_finished  # returned while the second request was still in flight
        assert len(sink.tiles) == 2  # the first request's tiles are written; the abandoned ones are not
    finally:
        client.release.set()


def test_cancel_while_waiting_for_the_last_request_returns_without_its_answer():
    """The panel's 1-second cancel: a cancel that arrives while the run only waits for the engine."""
    import threading

    class HeldClient(ColourClient):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.started = 0
            self.finished = False

        def ground(self, tiles, *args, **kwargs):
            self.started += 1
            self.release.wait(30)
            self.finished = True
            return super().ground(tiles, *args, **kwargs)

    source = ArraySource(paint(300, 300, OBJECTS), Affine.identity())
    job = GroundingJob("x", mode="all", tile_size=128, overlap=0, batch_size=64)  # one request for all 9 tiles
    client, sink = HeldClient(), RecordingSink()
    summary = run_grounding(job, source, sink, client, is_canceled=lambda: client.started >= 1)
    try:
        assert summary.status == "canceled" and sink.final is None
        assert client.started == 1 and not client.finished  # returned while the request was held
        assert sink.tiles == {}  # nothing of the abandoned request is marked done
    finally:
        client.release.set()


def test_progress_reports_every_tile():
    source = ArraySource(paint(300, 300, OBJECTS), Affine.identity())
    seen = []
    run_grounding(
        GroundingJob("x", tile_size=128, overlap=0),
        source,
        RecordingSink(),
        ColourClient(),
        progress=lambda d, t, p: seen.append((d, t, p)),
    )
    assert [d for d, _, _ in seen] == list(range(1, 10))
    assert all(t == 9 and p == "full" for _, t, p in seen)


# -- coarse to fine --------------------------------------------------------------------------------


def _big_scene(seed: int, size: int = 2048) -> tuple[np.ndarray, list[tuple[int, int, int, int, float]]]:
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(4):
        w, h = rng.integers(40, 120, 2)
        x, y = rng.integers(0, size - 120, 2)
        objects.append((int(x), int(y), int(x + w), int(y + h), float(rng.uniform(0.3, 0.95))))
    return paint(size, size, objects), objects


def test_coarse_scale_fits_the_area_in_the_coarse_grid():
    job = GroundingJob("x", mode="one", tile_size=256, overlap=32, coarse_grid=2)
    scale = coarse_scale(PixelBox(0, 0, 4000, 3000), job)
    assert 2 * 256 * scale - 32 * scale >= 4000


@pytest.mark.parametrize("seed", range(6))
def test_coarse_to_fine_agrees_with_the_full_tiling(seed):
    rgb, objects = _big_scene(seed)
    transform = Affine(0.5, 0, 600_000.0, 0, -0.5, 5_000_000.0)
    job = GroundingJob("x", mode="one", tile_size=256, overlap=32)
    full_client, fast_client = ColourClient(), ColourClient()
    full_sink, fast_sink = RecordingSink(), RecordingSink()
    full = run_grounding(
        GroundingJob("x", mode="one", tile_size=256, overlap=32, coarse_to_fine=False),
        ArraySource(rgb, transform),
        full_sink,
        full_client,
    )
    fast = run_grounding(job, ArraySource(rgb, transform), fast_sink, fast_client)
    assert full.strategy == "full" and fast.strategy == "coarse-to-fine"
    assert fast.tiles_total < full.tiles_total / 5
    assert {t for _, t in fast_client.calls} == {"multi", "rec"}
    best = max(objects, key=lambda o: o[4])
    assert full_sink.final[0].detection.box == PixelBox(*best[:4])
    assert fast_sink.final[0].detection.box == PixelBox(*best[:4])
    assert any(k.startswith("c-") for k in fast_sink.tiles) and any(k.startswith("f0-") for k in fast_sink.tiles)


def test_coarse_pass_with_nothing_falls_back_to_the_full_tiling():
    # A 1-pixel object vanishes in a 4x overview (nearest sampling misses it).
    rgb = paint(2048, 2048, [(1000, 1000, 1001, 1001, 0.9)])
    sink = RecordingSink()
    summary = run_grounding(
        GroundingJob("x", mode="one", tile_size=256, overlap=0),
        ArraySource(rgb, Affine.identity()),
        sink,
        ColourClient(),
    )
    assert summary.strategy == "coarse-to-fine+full"
    assert [m.detection.box for m in sink.final] == [PixelBox(1000, 1000, 1001, 1001)]


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expression": " "}, "expression is empty"),
        ({"mode": "some"}, "mode must be one of"),
        ({"overlap": 600}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_score": 2.0}, "min_score"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_job_rejects_bad_values(kwargs, message):
    base = {"expression": "tanks"}
    base.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        GroundingJob(**base)


def test_plan_full_ids_are_unique_and_task_follows_mode():
    source = ArraySource(paint(500, 300, []), Affine.identity())
    plan = plan_full(GroundingJob("x", mode="all", tile_size=128, overlap=16), source)
    ids = [i for i, _ in plan.tiles]
    assert len(ids) == len(set(ids)) and plan.task == "multi"
    assert GroundingJob("x", mode="one").task == "rec"


def test_summary_as_dict_is_plain():
    d = RunSummary(final=[MapDetection(Detection(PixelBox(0, 0, 1, 1)), ((0, 0), (1, 0), (1, 1), (0, 0)))]).as_dict()
    assert d["final"][0]["box"] == (0, 0, 1, 1)


def test_tile_image_from_array_roundtrip():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    t = TileImage.from_array(img)
    assert (t.width, t.height) == (3, 2)


# -- tiles in flight and several engines (issue 20) ---------------------------------------------------


class ConcurrentClient(ColourClient):
    """Counts the requests it works on at once; each takes ``delay`` seconds; may fail after ``fail_after`` calls."""

    def __init__(self, delay: float = 0.02, fail_after: int | None = None, error: Exception | None = None) -> None:
        import threading

        super().__init__()
        self.delay, self.fail_after, self.error = delay, fail_after, error
        self.lock = threading.Lock()
        self.now = self.peak = self.tiles = self.started = 0

    def ground(self, tiles, *args, **kwargs):
        import time

        with self.lock:
            if self.fail_after is not None and self.started >= self.fail_after:
                raise self.error
            self.started += 1
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay)
            out = super().ground(tiles, *args, **kwargs)
            with self.lock:
                self.tiles += len(tiles)
            return out
        finally:
            with self.lock:
                self.now -= 1


class EngineSink(RecordingSink):
    records_engine = True

    def __init__(self) -> None:
        super().__init__()
        self.engine_of: dict[str, str] = {}

    def write_tile(self, tile_id, tile, detections, status, engine=""):
        super().write_tile(tile_id, tile, detections, status)
        self.engine_of[tile_id] = engine


def _final(sink) -> list:
    return sorted((m.detection.box.as_tuple(), round(m.detection.score, 9)) for m in sink.final)


def test_in_flight_keeps_that_many_tiles_asked_at_once_and_writes_in_tile_order():
    source = ArraySource(paint(700, 650, OBJECTS), Affine.identity())
    reference = RecordingSink()
    run_grounding(GroundingJob("x", tile_size=96, overlap=16, batch_size=2), source, reference, ColourClient())
    client = ConcurrentClient(delay=0.05)
    sink = RecordingSink()
    job = GroundingJob("x", tile_size=96, overlap=16, batch_size=2, in_flight=8)
    summary = run_grounding(job, source, sink, client)
    assert summary.status == "done" and summary.tiles_processed == len(plan_full(job, source).tiles)
    assert client.peak == 4, "8 tiles in flight in requests of 2: four requests at once"
    assert list(sink.tiles) == [t for t, _ in plan_full(job, source).tiles]  # tile order, whatever came first
    assert _final(sink) == _final(reference)
    assert summary.engine_s <= summary.seconds  # the time anything was in flight, not a sum over requests


def test_an_engine_that_fails_mid_run_has_its_tiles_taken_by_the_others():
    from geo_r1_qgis.core.errors import EngineUnavailableError
    from geo_r1_qgis.core.pipeline import EnginePool, EngineSlot

    source = ArraySource(paint(700, 650, OBJECTS), Affine.identity())
    reference = RecordingSink()
    run_grounding(GroundingJob("x", tile_size=96, overlap=16, batch_size=2), source, reference, ColourClient())
    good_a, good_b = ConcurrentClient(), ConcurrentClient()
    bad = ConcurrentClient(fail_after=2, error=EngineUnavailableError("cannot reach the engine at b (reset)"))
    pool = EnginePool([EngineSlot(good_a, 2, "http://a"), EngineSlot(bad, 4, "http://b"),
                       EngineSlot(good_b, 2, "http://c")])  # fmt: skip
    sink = EngineSink()
    summary = run_grounding(GroundingJob("x", tile_size=96, overlap=16, batch_size=2), source, sink, pool)
    assert summary.status == "done" and list(summary.engines_failed) == ["http://b"]
    assert _final(sink) == _final(reference)
    assert set(sink.engine_of.values()) == {"http://a", "http://b", "http://c"}
    answered = {name: list(sink.engine_of.values()).count(name) for name in ("http://a", "http://b", "http://c")}
    assert answered == summary.engines and answered["http://b"] == bad.tiles == 4  # its two answered requests
    assert answered["http://a"] == good_a.tiles and answered["http://c"] == good_b.tiles


def test_a_refused_request_or_the_last_engine_failing_stops_the_run():
    from geo_r1_qgis.core.errors import EngineRequestError, EngineUnavailableError
    from geo_r1_qgis.core.pipeline import EnginePool, EngineSlot

    source = ArraySource(paint(400, 400, OBJECTS), Affine.identity())
    job = GroundingJob("x", tile_size=96, overlap=16, batch_size=2)
    refused = ConcurrentClient(fail_after=1, error=EngineRequestError("422: bad value", 422))
    pool = EnginePool([EngineSlot(ConcurrentClient(), 2, "http://a"), EngineSlot(refused, 2, "http://b")])
    with pytest.raises(EngineRequestError, match="422"):  # another engine would refuse it as well
        run_grounding(job, source, RecordingSink(), pool)
    gone = EngineUnavailableError("cannot reach the engine")
    pool = EnginePool([EngineSlot(ConcurrentClient(fail_after=1, error=gone), 2, "http://a"),
                       EngineSlot(ConcurrentClient(fail_after=2, error=gone), 2, "http://b")])  # fmt: skip
    sink = RecordingSink()
    with pytest.raises(EngineUnavailableError):
        run_grounding(job, source, sink, pool)
    assert len(sink.tiles) > 0  # what was answered before is kept (a resumed run asks only the rest)


def test_engine_pool_and_in_flight_check_themselves():
    from geo_r1_qgis.core.pipeline import EnginePool, EngineSlot

    with pytest.raises(ConfigError, match="at least one engine"):
        EnginePool([])
    with pytest.raises(ConfigError, match="given twice"):
        EnginePool([EngineSlot(ColourClient(), 2, "http://a"), EngineSlot(ColourClient(), 2, "http://a")])
    with pytest.raises(ConfigError, match="capacity"):
        EnginePool([EngineSlot(ColourClient(), 0, "http://a")])
    for bad in (0, -1, 2000, True, 2.5):
        with pytest.raises(ConfigError, match="in_flight"):
            GroundingJob("x", in_flight=bad)
