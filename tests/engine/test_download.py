"""``python -m engine.download``: its config checks, and its message when the Hub cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _serve_helpers import free_port

from engine.download import OFFLINE_HINT, DownloadConfig
from geo_r1_qgis.core.errors import ConfigError


@pytest.mark.parametrize(
    ("model", "fragment"),
    [("", "no model"), ("  ", "no model"), ("just-a-name", "not a Hugging Face id"), ("a/b/c", "owner/name")],
)
def test_bad_model_ids_are_refused(model, fragment):
    with pytest.raises(ConfigError, match=fragment):
        DownloadConfig(model=model)


def test_a_local_directory_needs_no_download(tmp_path):
    with pytest.raises(ConfigError, match="local directory already"):
        DownloadConfig(model=str(tmp_path))


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "engine.download", "Geo-R1/Geo-R1-3B-GRPO-REC-10shot"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip


def test_no_network_says_so_and_points_to_offline_mode(tmp_path):
    # A Hub endpoint nothing listens on: the same failure as a machine without the network, on any machine.
    proc = _run({"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the Hub cannot be reached from this machine" in proc.stderr
    assert OFFLINE_HINT in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_mode_is_named_when_it_is_on(tmp_path):
    proc = _run({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "Traceback" not in proc.stderr
