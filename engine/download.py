"""Download a model (or adapter) from the Hugging Face Hub into the local cache, with progress lines.

``python -m engine.download MODEL`` in the engine's venv; the QGIS plugin runs it in a QProcess and shows
its lines. The engine then loads the model by the same id without the network (``HF_HUB_OFFLINE=1``).
On a machine without the network it fails at once with a message that says so and what to do instead:
copy the model directory over and give its path as the model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.cli.options import add_config_arguments, config_from_args
from geo_r1_qgis.core.errors import ConfigError, EngineUnavailableError, GeoR1Error, ModelNotFoundError

log = logging.getLogger(__name__)

#: what to do without the network, in every message about it
OFFLINE_HINT = (
    "on a machine without the network: download the model on a connected machine (python -m engine.download "
    "MODEL there, or copy its directory), carry the directory over, give that directory as the model, and set "
    "HF_HUB_OFFLINE=1 so nothing tries the network"
)


@dataclass(frozen=True)
class DownloadConfig:
    model: str = field(
        metadata={"positional": True, "help": "a Hugging Face id, e.g. Geo-R1/Geo-R1-3B-GRPO-REC-10shot"}
    )
    revision: str | None = field(default=None, metadata={"help": "a branch, tag or commit (default: main)"})
    cache_dir: Path | None = field(default=None, metadata={"help": "the Hub cache (default: HF_HOME's)"})
    local_dir: Path | None = field(
        default=None, metadata={"help": "copy the files into this directory instead of the cache"}
    )

    def __post_init__(self) -> None:
        model = self.model.strip()
        if not model:
            raise ConfigError("no model given: pass a Hugging Face id such as Geo-R1/Geo-R1-3B-GRPO-REC-10shot")
        if Path(model).expanduser().is_dir():
            raise ConfigError(f"{model} is a local directory already: give it to the engine as the model, "
                              "there is nothing to download")  # fmt: skip
        if model.count("/") != 1 or model.startswith(("/", ".")):
            raise ConfigError(f"{model!r} is not a Hugging Face id (owner/name, e.g. Qwen/Qwen2.5-VL-3B-Instruct)")
        object.__setattr__(self, "model", model)


def _progress_class():
    """huggingface_hub's tqdm, writing one plain line per step instead of redrawing a bar."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class LineProgress(hf_tqdm):  # type: ignore[misc, valid-type]
        _last = -1.0

        def display(self, msg=None, pos=None):  # tqdm's signature
            total = self.total or 0
            pct = 100.0 * self.n / total if total else 0.0
            if pct - self._last >= 5.0 or (total and self.n >= total and self._last < 100.0):
                self._last = pct
                sys.stdout.write(f"progress: {self.desc or 'download'} {self.n}/{total or '?'} ({pct:.0f}%)\n")
                sys.stdout.flush()
            return True

    return LineProgress


def download(config: DownloadConfig) -> Path:
    """Fetch every file of ``config.model``; the local snapshot directory. Errors say what to do."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise EngineUnavailableError(
            f"cannot download {config.model}: HF_HUB_OFFLINE is set, so the network is off for the Hub. Unset it to "
            f"download, or {OFFLINE_HINT}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    t0 = time.monotonic()
    sys.stdout.write(f"downloading {config.model} ...\n")
    sys.stdout.flush()
    try:
        path = snapshot_download(
            config.model,
            revision=config.revision,
            cache_dir=config.cache_dir,
            local_dir=config.local_dir,
            tqdm_class=_progress_class(),
        )
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{config.model} is gated: accept its licence on its Hub page and log in (huggingface-cli login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no model {config.model!r} on the Hub (or it is private): check the id; a private one needs a login"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{config.model} has no revision {config.revision!r}") from None
    except LocalEntryNotFoundError as exc:  # what huggingface_hub raises when the Hub cannot be reached
        raise EngineUnavailableError(
            f"cannot download {config.model}: the Hub cannot be reached from this machine (no network, or a "
            f"proxy or firewall in the way: {str(exc).splitlines()[0][:200]}); {OFFLINE_HINT}"
        ) from None
    except OSError as exc:
        raise EngineUnavailableError(f"cannot download {config.model}: {exc}; {OFFLINE_HINT}") from None
    sys.stdout.write(f"done in {time.monotonic() - t0:.0f} s: {path}\n")
    sys.stdout.flush()
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The download options, one per :class:`DownloadConfig` field."""
    add_config_arguments(parser, DownloadConfig)


def main(args: argparse.Namespace) -> int:
    download(config_from_args(DownloadConfig, args))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m engine.download", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    logging.basicConfig(level=logging.WARNING)
    try:
        sys.exit(main(_parser.parse_args()))
    except GeoR1Error as _exc:
        sys.stderr.write(f"download: error: {_exc}\n")
        sys.exit(1)
