"""``geo-r1 ask``: one plain image through the real loading path, printed for a person."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.cli.ask import AskConfig
from engine.runtime.loading import parse_adapters
from geo_r1_qgis.core.errors import ConfigError

pytestmark = pytest.mark.slow


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "ask", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("ask") / "tile.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)).save(path)
    return path


def test_ask_prints_reasoning_and_boxes_in_the_images_pixels(image, tiny_format_model_dir):
    out = _run(
        image, "the largest storage tank", "--model", tiny_format_model_dir, "--task", "rec", "--max-new-tokens", "128"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("reasoning: ")
    assert lines[1].startswith("parse status: ")
    boxes = [ln for ln in lines if ln.startswith("box ")]
    assert len(boxes) <= 1  # rec: exactly one box at most
    for ln in boxes:
        x1, y1, x2, y2 = (float(v) for v in ln.split("[")[1].split("]")[0].split(","))
        assert 0 <= x1 < x2 <= 420 and 0 <= y1 < y2 <= 300


def test_ask_json_is_the_engines_result(image, tiny_format_model_dir):
    out = _run(image, "all storage tanks", "--model", tiny_format_model_dir, "--json", "--max-new-tokens", "64")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["image_size"] == [420, 300]
    assert result["model_size"] == [420, 308]  # smart_resize: multiples of 28
    assert result["tokens_generated"] <= 64


def test_ask_bad_inputs_give_one_clear_line(tmp_path, image, tiny_model_dir):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = _run(corrupt, "tanks", "--model", tiny_model_dir)
    assert out.returncode == 1
    assert "cannot read" in out.stderr and str(corrupt) in out.stderr
    missing_model = tmp_path / "no-such-model"
    out = _run(image, "tanks", "--model", missing_model)
    assert out.returncode == 1
    assert str(missing_model) in out.stderr


def test_ask_config_and_adapter_parsing(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    with pytest.raises(ConfigError, match="does not exist"):
        AskConfig(image=tmp_path / "nope.png", expression="x", model="m")
    with pytest.raises(ConfigError, match="expression is empty"):
        AskConfig(image=img, expression="  ", model="m")
    with pytest.raises(ConfigError, match=r"--task must be one of \('rec', 'multi', 'gres'\)"):  # prompts.TASKS
        AskConfig(image=img, expression="x", model="m", task="ovd")
    assert parse_adapters(["a=/p/a", "/q/bee"]) == {"a": "/p/a", "bee": "/q/bee"}
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_adapters(["=/p"])
    with pytest.raises(ConfigError, match="two adapters are named 'a'"):
        parse_adapters(["a=/p/a", "/q/a"])
