"""``--box-frame``: which pixels the model's boxes are in (geo_r1_qgis.core.rules.coords.BOX_FRAMES)."""

from __future__ import annotations

import pytest

from engine.runtime.backend import item_result
from geo_r1_qgis.core.rules.parsing import parse_output

TEXT = '<think> t </think> <answer>[{"bbox_2d": [252, 252, 504, 504], "label": "x"}]</answer>'


@pytest.mark.parametrize(
    ("frame", "want"),
    [
        ("model", (256.0, 256.0, 512.0, 512.0)),  # a 512 tile is seen as 504: scaled back by 512/504
        ("image", (252.0, 252.0, 504.0, 504.0)),  # already the tile's own pixels: unchanged
    ],
)
def test_box_frame_decides_the_scaling(frame, want):
    parsed = parse_output(TEXT, "multi", True)
    result = item_result(TEXT, parsed, [0.9], 0.9, (504, 504), (512, 512), 10, {}, box_frame=frame)
    assert result.boxes[0].x1 == pytest.approx(want[0]) and result.boxes[0].x2 == pytest.approx(want[2])


def test_frames_agree_on_multiples_of_28():
    parsed = parse_output(TEXT, "multi", True)
    a = item_result(TEXT, parsed, [0.9], 0.9, (504, 504), (504, 504), 10, {}, box_frame="model")
    b = item_result(TEXT, parsed, [0.9], 0.9, (504, 504), (504, 504), 10, {}, box_frame="image")
    assert a.boxes == b.boxes


def test_serve_rejects_an_unknown_frame():
    from engine.server.app import ServeConfig
    from geo_r1_qgis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--box-frame"):
        ServeConfig(model="m", box_frame="pixels")


def test_the_backend_task_type_names_the_prompts_tasks():
    """The tasks are named once (rules/prompts.TASKS); the backend's Literal type and the API model's mirror it."""
    import typing

    from engine.runtime import backend
    from engine.server.api_models import _QueryIn
    from geo_r1_qgis.core.rules.prompts import TASKS
    from train import data_format

    assert backend.TASKS is TASKS and data_format.TASKS is TASKS
    assert typing.get_args(backend.Task) == TASKS
    assert typing.get_args(_QueryIn.model_fields["task"].annotation) == TASKS
