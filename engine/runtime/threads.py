"""How many CPU threads torch may use, and how they wait.

On a CPU that other programs share (QGIS beside the engine, always), torch's default, one OpenMP thread
per core with active (spinning) waits, collapses: threads spin for cores they do not get. BENCHMARKS.md
measured the tiny model 42x slower per item at the default than with one thread, on 2 cores with two busy
processes beside it. So the engine uses ``cores - 1`` threads (at least 1), leaving a core to the desktop,
and OpenMP's passive wait policy (idle threads sleep). ``--threads N`` overrides the count.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Set before torch (and its OpenMP runtime) is first imported; a value the user set is kept.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """``cores - 1``, at least 1."""
    n = usable_cores() if cores is None else cores
    return max(1, n - 1)


def prepare_environment() -> None:
    """Passive OpenMP waits, unless the user chose otherwise. Call before importing torch."""
    for key, value in OMP_ENV.items():
        os.environ.setdefault(key, value)


def configure_torch_threads(threads: int | None) -> int:
    """Give torch ``threads`` intra-op threads (None: :func:`default_threads`); return the number used."""
    import torch

    n = default_threads() if threads is None else threads
    if n < 1:
        from geo_r1_qgis.core.errors import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    log.info("torch uses %d CPU thread(s) (OMP_WAIT_POLICY=%s)", n, os.environ.get("OMP_WAIT_POLICY", "unset"))
    return n
