"""Outlines through the pipeline's pure steps: engine JSON -> tile pixels -> raster pixels -> map (rotated too)."""

from __future__ import annotations

import pytest

from geo_r1_qgis.core.client import GroundResult
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile, ring_signed_area
from geo_r1_qgis.core.merge import merge_detections
from geo_r1_qgis.core.outline import polygon_area
from geo_r1_qgis.core.pipeline import GroundingJob, place, result_to_detections

SQUARE = [[[10, 20], [30, 20], [30, 40], [10, 40], [10, 20]]]  # tile pixels, one ring


def answer(outline) -> GroundResult:
    box = {"bbox": [8, 18, 32, 42], "score": 0.9, "label": "tank", "outline": outline}
    return GroundResult.from_json({"boxes": [box], "presence": 1.0, "reasoning": "r", "parse_status": "ok"})


def tile(x0: float, y0: float, scale: float = 1.0, size: int = 100) -> Tile:
    window = PixelBox(x0, y0, x0 + size * scale, y0 + size * scale)
    return Tile(0, 0, 0, window, (size, size), Affine(scale, 0, x0, 0, scale, y0))


def test_outline_reaches_raster_pixels_by_the_tiles_scale() -> None:
    t = tile(200, 100, scale=2.0)
    (det,) = result_to_detections(answer([SQUARE]), "r0c0", t, 1000, 1000, PixelBox(0, 0, 1000, 1000))
    (poly,) = det.outline
    assert {tuple(p) for p in poly[0]} == {(220.0, 140.0), (260.0, 140.0), (260.0, 180.0), (220.0, 180.0)}
    assert det.outline_step == 2.0


@pytest.mark.parametrize(
    "transform",
    [Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4200000.0), Affine(0.3, 0.4, 10.0, 0.4, -0.3, 20.0)],
    ids=["north-up", "rotated"],
)
def test_outline_on_the_map_goes_through_the_rasters_affine(transform: Affine) -> None:
    (det,) = result_to_detections(answer([SQUARE]), "r0c0", tile(0, 0), 100, 100, PixelBox(0, 0, 100, 100))
    (m,) = place([det], transform)
    (poly,) = m.outline
    assert ring_signed_area([tuple(p) for p in poly[0]]) > 0  # counter-clockwise on the map, as the box ring
    want = {tuple(round(v, 6) for v in transform.apply(x, y)) for x, y in [(10, 20), (30, 20), (30, 40), (10, 40)]}
    assert {tuple(round(float(v), 6) for v in p) for p in poly[0]} == want
    assert polygon_area(poly) == pytest.approx(400 * abs(transform.determinant))


def test_no_outline_when_the_engine_sent_none() -> None:
    (det,) = result_to_detections(answer(None), "r0c0", tile(0, 0), 100, 100, PixelBox(0, 0, 100, 100))
    assert det.outline == ()
    assert place([det], Affine(1, 0, 0, 0, -1, 0))[0].outline == ()


def test_a_truncated_object_in_two_tiles_gets_one_outline() -> None:
    area = PixelBox(0, 0, 200, 100)
    left = GroundResult.from_json({"boxes": [{"bbox": [60, 20, 100, 60], "score": 0.8,
                                              "outline": [[[[60, 20], [100, 20], [100, 60], [60, 60], [60, 20]]]]}],
                                   "presence": 1.0})  # fmt: skip
    right = GroundResult.from_json({"boxes": [{"bbox": [0, 20, 30, 60], "score": 0.7,
                                               "outline": [[[[0, 20], [30, 20], [30, 60], [0, 60], [0, 20]]]]}],
                                    "presence": 1.0})  # fmt: skip
    dets = result_to_detections(left, "r0c0", tile(0, 0), 200, 100, area)
    dets += result_to_detections(right, "r0c1", tile(100, 0), 200, 100, area)
    assert all(d.truncated for d in dets)
    (merged,) = merge_detections(dets)
    assert len(merged.outline) == 1
    assert polygon_area(merged.outline[0]) == pytest.approx(70 * 40)


def test_gres_needs_mode_all() -> None:
    from geo_r1_qgis.core.errors import ConfigError

    assert GroundingJob("tanks", gres=True).task == "gres"
    assert GroundingJob("tanks", mode="one", outline=True).outlines
    with pytest.raises(ConfigError, match="mode all"):
        GroundingJob("tanks", mode="one", gres=True)


def test_outlines_do_not_take_part_in_equality() -> None:
    a = answer([SQUARE]).boxes[0]
    b = answer(None).boxes[0]
    assert a == b and a.outline and not b.outline
