"""``--time-limit``: the wall time a run spends training and validating, counted across resumes, against its budget.

The learning-rate schedule reads the share of the budget used (instead of the share of the steps), and the epoch loop
asks whether one more step and the validation that must follow it still fit, so that a run ends at its budget with
its best checkpoint validated.
"""

from __future__ import annotations

import time


class RunClock:
    """Seconds used by a run's training and validation (those of earlier sessions, then this one's), against a budget
    in seconds (None: no time limit)."""

    def __init__(self, budget: float | None) -> None:
        self.budget, self._before, self._started = budget, 0.0, None

    def start(self, used: float = 0.0) -> None:
        """Count from now on, after ``used`` seconds of earlier sessions (a resumed run's)."""
        self._before, self._started = used, time.perf_counter()

    def used(self) -> float:
        return self._before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def fraction(self) -> float:
        """The share of the budget used, 0 to 1 (0 without a budget)."""
        return min(1.0, self.used() / self.budget) if self.budget else 0.0

    def cannot_fit(self, seconds: float) -> bool:
        """Whether ``seconds`` more would run past the budget (never, without one)."""
        return self.budget is not None and self.used() + seconds > self.budget
