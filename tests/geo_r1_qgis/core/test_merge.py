"""Tests of geo_r1_qgis/core/merge.py: pure, run under the venv's Python and under QGIS's Python."""

from __future__ import annotations

import itertools
import random

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import Affine, PixelBox, TileGridSpec, make_tile_grid
from geo_r1_qgis.core.merge import (
    Detection,
    flag_truncated,
    merge_detections,
    refinement_windows,
    select_mode,
)

T = Affine(0.5, 0.0, 630000.0, 0.0, -0.5, 4250000.0)


def det(x1, y1, x2, y2, score=0.9, truncated=False, tile_id="", label="tank", presence=0.8):
    return Detection(
        PixelBox(x1, y1, x2, y2), score=score, presence=presence, label=label, tile_id=tile_id, truncated=truncated
    )


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score": 1.5}, "score"),
        ({"score": -0.1}, "score"),
        ({"score": float("nan")}, "score"),
        ({"presence": 2.0}, "presence"),
        ({"box": (0, 0, 1, 1)}, "PixelBox"),
    ],
)
def test_detection_validation(kwargs, match):
    args = {"box": PixelBox(0, 0, 1, 1), **kwargs}
    with pytest.raises(ConfigError, match=match):
        Detection(**args)


# ------------------------------------------------------------------------------------------------
# flag_truncated
# ------------------------------------------------------------------------------------------------

# 1000 x 700 raster, 512/64 tiles: columns at 0, 448, 488; rows at 0, 188.
GRID = make_tile_grid(T, 1000, 700, TileGridSpec(512, 64))
BY_ID = {t.id: t for t in GRID}


@pytest.mark.parametrize(
    ("tile_id", "box", "expected"),
    [
        ("r0c0", (0, 0, 50, 50), False),  # top-left raster corner: both edges are raster edges
        ("r0c0", (100, 100, 200, 200), False),  # interior
        ("r0c0", (450, 100, 512, 200), True),  # right edge is inner
        ("r0c0", (450, 100, 510.5, 200), True),  # within tol_px=2 of it
        ("r0c0", (450, 100, 509.0, 200), False),  # 3 px away
        ("r0c0", (100, 480, 200, 512), True),  # bottom edge is inner
        ("r0c1", (0, 100, 30, 200), True),  # left edge of a middle column is inner
        ("r0c1", (100, 0, 200, 30), False),  # top edge is the raster's
        ("r1c2", (400, 400, 512, 512), False),  # bottom-right raster corner
        ("r1c2", (0, 400, 30, 512), True),  # its left edge is inner
        ("r1c2", (100, 0, 200, 30), True),  # its top edge is inner
    ],
)
def test_flag_truncated(tile_id, box, expected):
    assert flag_truncated(PixelBox(*box), BY_ID[tile_id], 1000, 700) is expected


def test_flag_truncated_respects_the_area_edge():
    area = PixelBox(100, 100, 700, 500)
    tiles = make_tile_grid(T, 1000, 700, TileGridSpec(256, 32), window=area)
    first = tiles[0]
    assert first.window.x1 == 100
    box = PixelBox(0, 0, 20, 20)  # touches the tile's left and top edges, which are the area's
    assert flag_truncated(box, first, 1000, 700, area=area) is False
    assert flag_truncated(box, first, 1000, 700) is True  # but inner edges of the whole raster


def test_flag_truncated_tolerance_is_in_tile_pixels():
    tile = make_tile_grid(T, 4096, 4096, TileGridSpec(512, 64, 2.0))[0]
    near = PixelBox(100, 100, 509, 200)  # 3 tile px = 6 raster px from the right edge
    assert flag_truncated(near, tile, 4096, 4096, tol_px=2.0) is False
    assert flag_truncated(near, tile, 4096, 4096, tol_px=3.0) is True
    with pytest.raises(ConfigError, match="tol_px"):
        flag_truncated(near, tile, 4096, 4096, tol_px=-1)


# ------------------------------------------------------------------------------------------------
# merge_detections
# ------------------------------------------------------------------------------------------------


def test_duplicates_from_overlapping_tiles_are_fused():
    a = det(460, 100, 500, 140, score=0.7, tile_id="r0c0")
    b = det(461, 101, 501, 141, score=0.9, tile_id="r0c1")
    (merged,) = merge_detections([a, b])
    assert merged.box == b.box and merged.score == 0.9 and merged.tile_id == "r0c1"


def test_separate_objects_stay_separate():
    dets = [det(0, 0, 10, 10), det(20, 0, 30, 10), det(10, 0, 20, 10)]  # touching, not overlapping
    assert len(merge_detections(dets)) == 3


def test_box_cut_by_tile_edge_is_kept_once_as_the_whole_box():
    # A tank at raster x 490..530 straddles r0c0's right edge (512); r0c1 (448..960) sees it whole.
    whole_raster = PixelBox(490, 100, 530, 140)
    left, right = BY_ID["r0c0"], BY_ID["r0c1"]
    cut = whole_raster.intersection(left.window)
    cut_in_tile = left.to_tile(cut)
    whole_in_tile = right.to_tile(whole_raster)
    assert flag_truncated(cut_in_tile, left, 1000, 700)
    assert not flag_truncated(whole_in_tile, right, 1000, 700)
    dets = [
        Detection(left.to_raster(cut_in_tile), score=0.95, tile_id=left.id, truncated=True),
        Detection(right.to_raster(whole_in_tile), score=0.6, tile_id=right.id, truncated=False),
    ]
    (merged,) = merge_detections(dets)
    assert merged.box.as_tuple() == pytest.approx(whole_raster.as_tuple())
    assert merged.tile_id == right.id and not merged.truncated
    assert merged.score == 0.95  # the group's best score


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_transitive_groups(order):
    a, b, c = det(0, 0, 10, 10, 0.5), det(3, 0, 13, 10, 0.6), det(6, 0, 16, 10, 0.7)
    assert a.box.iou(b.box) >= 0.5 and b.box.iou(c.box) >= 0.5
    assert a.box.iou(c.box) < 0.5 and a.box.intersection_area(c.box) / 100 < 0.7  # A, C alone would not pair
    boxes = [a, b, c]
    (merged,) = merge_detections([boxes[i] for i in order])
    assert merged.box == c.box and merged.score == 0.7


def test_containment_groups_a_box_inside_another():
    big, small = det(0, 0, 100, 100, 0.6), det(10, 10, 40, 40, 0.8)
    assert big.box.iou(small.box) < 0.5
    (merged,) = merge_detections([big, small])
    assert merged.box == small.box  # the best-scoring whole member wins
    assert len(merge_detections([big, small], containment_threshold=1.0, iou_threshold=0.99)) == 1
    partly = det(90, 90, 120, 120, 0.8)  # 1/9 of it inside: neither rule applies
    assert len(merge_detections([big, partly])) == 2


def test_all_truncated_gives_the_union():
    # An object larger than the overlap: each tile sees only a piece, cut by its inner edge.
    p1 = det(300, 100, 512, 200, 0.6, truncated=True, tile_id="r0c0")
    p2 = det(448, 102, 700, 198, 0.8, truncated=True, tile_id="r0c1")
    assert p1.box.iou(p2.box) < 0.5
    assert p1.box.intersection_area(p2.box) / min(p1.box.area, p2.box.area) < 0.7
    (merged,) = merge_detections([p1, p2])
    assert merged.box == PixelBox(300, 100, 700, 200)
    assert merged.score == 0.8 and merged.truncated
    assert merged.tile_id == "r0c0+r0c1"


def test_truncated_pieces_that_do_not_touch_stay_apart():
    p1 = det(300, 100, 512, 200, 0.6, truncated=True)
    p2 = det(520, 100, 700, 200, 0.8, truncated=True)
    assert len(merge_detections([p1, p2])) == 2
    assert len(merge_detections([p1, p2], gap_tol_px=8.0)) == 1


def test_truncated_pieces_that_only_touch_are_joined():
    # Overlap 0: the two halves of a cut object share an edge and no area.
    p1 = det(480, 100, 512, 140, 0.6, truncated=True)
    p2 = det(512, 101, 530, 139, 0.8, truncated=True)
    (merged,) = merge_detections([p1, p2])
    assert merged.box == PixelBox(480, 100, 530, 140)
    # ... but not when their extents along the cut disagree (two different objects side by side).
    p3 = det(512, 135, 530, 180, 0.8, truncated=True)
    assert len(merge_detections([p1, p3])) == 2
    # ... and never for whole boxes that merely touch.
    assert len(merge_detections([det(480, 100, 512, 140), det(512, 100, 540, 140)])) == 2


def test_merge_keeps_whole_member_over_higher_scoring_truncated_ones():
    dets = [
        det(0, 0, 50, 50, 0.99, truncated=True, tile_id="a"),
        det(0, 0, 60, 50, 0.5, tile_id="b"),
        det(1, 0, 60, 50, 0.4, tile_id="c"),
    ]
    (merged,) = merge_detections(dets)
    assert merged.tile_id == "b" and merged.score == 0.99 and not merged.truncated
    assert merged.presence == 0.8


def test_merge_output_is_sorted_and_independent_of_input_order():
    rng = random.Random(7)
    dets = []
    for _ in range(40):
        x, y = rng.uniform(0, 900), rng.uniform(0, 600)
        w, h = rng.uniform(5, 60), rng.uniform(5, 60)
        dets.append(det(x, y, x + w, y + h, round(rng.random(), 3), truncated=rng.random() < 0.2))
    first = merge_detections(dets)
    for _ in range(5):
        rng.shuffle(dets)
        assert merge_detections(dets) == first
    assert [d.score for d in first] == sorted((d.score for d in first), reverse=True)
    # No two outputs would still be merged with each other.
    for p, q in itertools.combinations(first, 2):
        if not (p.truncated and q.truncated):
            inter = p.box.intersection_area(q.box)
            assert p.box.iou(q.box) < 0.5 and inter / min(p.box.area, q.box.area) < 0.7


def test_merge_empty():
    assert merge_detections([]) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iou_threshold": 0.0}, "iou_threshold"),
        ({"iou_threshold": 1.5}, "iou_threshold"),
        ({"containment_threshold": -1.0}, "containment_threshold"),
        ({"gap_tol_px": -1.0}, "gap_tol_px"),
    ],
)
def test_merge_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        merge_detections([], **kwargs)


# End to end: objects on a raster, seen by every tile that overlaps them, merged back to one each.
SIM_SPECS = [TileGridSpec(256, 64, 1.0), TileGridSpec(252, 56, 1.0), TileGridSpec(128, 48, 2.0), TileGridSpec(200, 0)]


def _simulate(objects, spec, width, height):
    dets = []
    for tile in make_tile_grid(T, width, height, spec):
        for i, obj in enumerate(objects):
            seen = obj.intersection(tile.window)
            if seen is None:
                continue
            in_tile = tile.to_tile(seen)
            truncated = flag_truncated(in_tile, tile, width, height, tol_px=0.5)
            score = 0.5 + 0.4 * ((i * 7 + tile.index * 3) % 10) / 10  # varies by tile
            dets.append(Detection(tile.to_raster(in_tile), score=score, tile_id=tile.id, truncated=truncated))
    return dets


@pytest.mark.parametrize("spec", SIM_SPECS, ids=lambda s: f"{s.tile_size}-{s.overlap}-{s.scale}")
def test_every_object_is_kept_exactly_once(spec):
    width, height = 700, 600
    # Objects on a lattice, with gaps between them, some of which straddle tile edges.
    objects = [PixelBox(x, y, x + 30, y + 24) for x in range(5, 660, 45) for y in range(7, 570, 37)]
    dets = _simulate(objects, spec, width, height)
    assert len(dets) > len(objects)  # some objects were seen by several tiles
    merged = merge_detections(dets)
    assert len(merged) == len(objects)
    for obj in objects:
        (match,) = [m for m in merged if m.box.iou(obj) > 0.5]
        assert match.box.as_tuple() == pytest.approx(obj.as_tuple())


def test_object_larger_than_tiles_is_reassembled():
    big = PixelBox(100, 150, 600, 450)  # wider and taller than a 256 px tile
    dets = _simulate([big], TileGridSpec(256, 32), 700, 600)
    assert all(d.truncated for d in dets)
    (merged,) = merge_detections(dets)
    assert merged.box.as_tuple() == pytest.approx(big.as_tuple())
    assert merged.truncated


# ------------------------------------------------------------------------------------------------
# select_mode
# ------------------------------------------------------------------------------------------------


def test_select_mode():
    dets = [det(0, 0, 1, 1, 0.3), det(5, 5, 6, 6, 0.9), det(9, 9, 10, 10, 0.6)]
    assert select_mode(dets, "one") == [dets[1]]
    assert select_mode(dets, "all") == [dets[1], dets[2], dets[0]]
    assert select_mode([], "one") == []
    assert select_mode([], "all") == []


def test_select_mode_ties_are_deterministic():
    a, b = det(50, 50, 60, 60, 0.9), det(0, 0, 10, 10, 0.9)
    assert select_mode([a, b], "one") == select_mode([b, a], "one") == [b]  # top-most, then left-most


@pytest.mark.parametrize("mode", ["best", "ONE", "", None])
def test_select_mode_rejects_unknown(mode):
    with pytest.raises(ConfigError, match="mode"):
        select_mode([], mode)


# ------------------------------------------------------------------------------------------------
# refinement_windows
# ------------------------------------------------------------------------------------------------


def test_refinement_windows_are_centred_tile_sized_and_inside():
    coarse = [det(1000, 1000, 1040, 1040, 0.9), det(10, 10, 30, 30, 0.8), det(4000, 2000, 4090, 2040, 0.7)]
    wins = refinement_windows(coarse, 4096, 2048, 512, top_k=3)
    assert len(wins) == 3
    for w in wins:
        assert (w.width, w.height) == (512, 512)
        assert w.x1 >= 0 and w.y1 >= 0 and w.x2 <= 4096 and w.y2 <= 2048
    assert wins[0].center == (1020.0, 1020.0)  # room to centre it
    assert wins[1].as_tuple() == (0, 0, 512, 512)  # clamped into the top-left corner
    assert wins[2].as_tuple() == (4096 - 512, 2048 - 512, 4096, 2048)  # and the bottom-right one
    for w, c in zip(wins, coarse, strict=True):
        assert w.contains(c.box)


def test_refinement_windows_dedupe_and_top_k():
    coarse = [
        det(1000, 1000, 1040, 1040, 0.9),
        det(1010, 1005, 1050, 1045, 0.85),  # same place: its window duplicates the first
        det(3000, 1000, 3040, 1040, 0.5),
        det(200, 1500, 240, 1540, 0.4),
    ]
    wins = refinement_windows(coarse, 4096, 2048, 512, top_k=2)
    assert len(wins) == 2
    assert wins[0].contains(coarse[0].box) and wins[1].contains(coarse[2].box)
    assert len(refinement_windows(coarse, 4096, 2048, 512, top_k=10)) == 3
    assert refinement_windows(coarse, 4096, 2048, 512, top_k=0) == []
    assert refinement_windows([], 4096, 2048, 512) == []


def test_refinement_window_for_raster_smaller_than_tile():
    (w,) = refinement_windows([det(10, 10, 20, 20)], 300, 200, 512)
    assert w == PixelBox(0, 0, 300, 200)


@pytest.mark.parametrize(
    ("args", "match"),
    [((100, 100, 0), "tile_size"), ((100, 100, 64.5), "tile_size"), ((0, 100, 64), "raster size")],
)
def test_refinement_windows_validation(args, match):
    with pytest.raises(ConfigError, match=match):
        refinement_windows([], *args)
