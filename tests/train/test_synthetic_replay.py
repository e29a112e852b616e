"""``geo-r1 dataset synthetic`` (issue 18 §4): ``--replay N`` (make demo-train) mixes N annotations of storage
tanks at the scenes' own resolution into a few-shot train split read at another --gsd, counted apart from the
shots, with the few-shot part the same as without replay; ``--categories smallest-tank`` annotates the one tank
a referring expression selects (the few-shot benchmark's held-out expression)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rasterio")

from geo_r1_qgis.core.errors import ConfigError
from train.data_format import read_manifest, read_records
from train.dataset import CHIPS_INDEX, SyntheticConfig, build_synthetic


def _chips(ds: Path) -> list[dict]:
    return [json.loads(line) for line in (ds / CHIPS_INDEX).read_text(encoding="utf-8").splitlines()]


def _targets(ds: Path, prefix: str) -> set[tuple[str, int]]:
    return {
        (c["raster"], c["annotation"]["fid"])
        for c in _chips(ds)
        if c["split"] == "train" and c["annotation"] and not c["negative"] and c["raster"].startswith(prefix)
    }


def test_replay_mixes_native_tanks_into_the_few_shot_set(tmp_path):
    plain = SyntheticConfig(out_dir=tmp_path / "plain", shots=2, seed=3, categories="building", style="all",
                            gsd=0.75)  # fmt: skip
    build_synthetic(plain)
    mixed = SyntheticConfig(**{**plain.__dict__, "out_dir": tmp_path / "mixed", "replay": 3})
    build_synthetic(mixed)
    # the few-shot part is the same set of buildings, the replay adds exactly 3 tank annotations from its own scenes
    assert _targets(tmp_path / "mixed", "rasters/scene-") == _targets(tmp_path / "plain", "rasters/scene-")
    replayed = _targets(tmp_path / "mixed", "rasters/replay-")
    assert len(replayed) == 3
    chips = _chips(tmp_path / "mixed")
    assert {c["expression"] for c in chips if c["raster"].startswith("rasters/replay-")} == {"all storage tanks"}
    assert all(c["split"] == "train" for c in chips if c["raster"].startswith("rasters/replay-"))
    sources = {s["path"]: s for s in read_manifest(tmp_path / "mixed")["sources"]}
    for path, s in sources.items():  # replay scenes at their own 0.5 m, the rest at --gsd 0.75
        assert s["gsd_m"] == pytest.approx(0.5 if path.startswith("rasters/replay-") else 0.75), path
    train = read_records(tmp_path / "mixed", "train", "multi")
    assert {r.expression for r in train} == {"all buildings", "all storage tanks"}
    assert {r.expression for r in read_records(tmp_path / "mixed", "test", "multi")} == {"all buildings"}


def test_replay_refuses_a_negative_count(tmp_path):
    with pytest.raises(ConfigError, match="--replay"):
        SyntheticConfig(out_dir=tmp_path / "x", shots=1, replay=-1)


def test_a_single_tank_selection_gives_rec_chips_of_its_expression(tmp_path):
    cfg = SyntheticConfig(out_dir=tmp_path / "small", shots=2, seed=1, categories="smallest-tank", style="short",
                          test_scenes=1)  # fmt: skip
    build_synthetic(cfg)
    train = read_records(tmp_path / "small", "train", "rec")
    # whatever --style, the expression is the referring expression; each rec chip holds the one smallest tank
    assert train and {r.expression for r in train} == {"the smallest storage tank"}
    assert all(len(r.boxes) == 1 for r in train)
    targets = _targets(tmp_path / "small", "rasters/scene-")
    assert len(targets) == 2  # two shots: two annotated tanks, each the clearly smallest of its scene
    assert {c["expression"] for c in _chips(tmp_path / "small")} == {"the smallest storage tank"}


def test_an_unknown_category_names_the_selections(tmp_path):
    with pytest.raises(ConfigError, match="smallest-tank"):
        SyntheticConfig(out_dir=tmp_path / "x", shots=1, categories="pool")
