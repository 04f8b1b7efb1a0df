"""Step budgets with a wall-clock cap: a stage runs its planned steps, unless its deadline comes first; the
learning-rate schedule follows whichever is further along, so a capped stage still anneals to the end."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


def cosine_lr(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor * peak` at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class StageClock:
    steps: int
    deadline: float  # time.monotonic() value
    start: float = field(default_factory=time.monotonic)

    def effective_step(self, step: int) -> int:
        """`step`, or the step the elapsed share of the time budget corresponds to, whichever is larger."""
        budget = self.deadline - self.start
        by_time = (time.monotonic() - self.start) / budget if budget > 0 else 1.0
        return max(step, int(by_time * self.steps))

    def done(self, step: int) -> bool:
        return self.effective_step(step) >= self.steps

    def elapsed(self) -> float:
        return time.monotonic() - self.start
