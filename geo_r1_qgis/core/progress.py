"""One continuous 0–100 % over a run's passes (pure).

The run loop reports ``(done, total, phase)`` with ``done`` counted over the whole run and ``total``
growing when a later pass is planned (mode ``one`` over a large area: a ``coarse`` pass, then a
``refine`` pass, or the ``full`` tiling when the coarse pass found nothing). A plain ``done / total``
would jump back when the second pass is planned; this tracker gives the coarse pass its expected share
of the work and spreads the rest over what follows, so the bar only moves forward.
"""

from __future__ import annotations

from typing import Any


class ProgressTracker:
    def __init__(self, job: Any) -> None:
        self.job = job
        self.phase = ""
        self.base = 0.0
        self.phase_start = 0
        self.last_done = 0
        self.last = 0.0

    def coarse_share(self, coarse_total: int) -> float:
        """The coarse pass's share of the bar: its tiles against about one refine tile per candidate."""
        refine = max(1, int(getattr(self.job, "top_k", 3)))
        return 100.0 * coarse_total / (coarse_total + refine)

    def percent(self, done: int, total: int, phase: str) -> float:
        if phase != self.phase:
            self.base, self.phase_start, self.phase = self.last, self.last_done, phase
        if phase == "coarse":
            value = self.coarse_share(total) * done / max(1, total)
        else:
            span = max(1, total - self.phase_start)
            value = self.base + (100.0 - self.base) * (done - self.phase_start) / span
        value = min(100.0, max(self.last, value))
        self.last, self.last_done = value, done
        return value
