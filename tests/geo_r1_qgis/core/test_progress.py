import itertools

from geo_r1_qgis.core.pipeline import GroundingJob
from geo_r1_qgis.core.progress import ProgressTracker


def _run(calls):
    tracker = ProgressTracker(GroundingJob("x", mode="one", top_k=3))
    return [tracker.percent(*c) for c in calls]


def test_one_pass_is_done_over_total():
    assert _run([(1, 4, "full"), (2, 4, "full"), (4, 4, "full")]) == [25.0, 50.0, 100.0]


def test_coarse_then_refine_moves_only_forward_and_ends_at_100():
    # 4 coarse tiles, then 6 refine tiles planned (total grows from 4 to 10)
    calls = [(d, 4, "coarse") for d in range(1, 5)] + [(d, 10, "refine") for d in range(5, 11)]
    values = _run(calls)
    assert all(b > a for a, b in itertools.pairwise(values))
    assert values[3] < 100.0  # the coarse pass does not fill the bar
    assert abs(values[3] - 100.0 * 4 / 7) < 1e-9  # its share: 4 tiles against top_k=3 refine tiles
    assert values[-1] == 100.0


def test_coarse_then_full_fallback_is_monotone():
    calls = [(d, 4, "coarse") for d in range(1, 5)] + [(d, 29, "full") for d in range(5, 30)]
    values = _run(calls)
    assert values == sorted(values) and values[-1] == 100.0
