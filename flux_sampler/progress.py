"""Where a sampling step sits in its run: the one definition of step progress.

The sampling loop knows the step index; everything that varies over a run (the guidance curve, the true-CFG
window, ControlNet start/end windows, the step cache's window, fp8 calibration) reads it from the
`StepPosition` the loop hands down, never from the sigma value.

Two views of the same position are needed because the references define them differently:
- `progress` is a point, i / (n - 1): the first step sees a curve's start and the last step its end (guidance
  curves and every window of ours);
- `span` is the interval [i / n, (i + 1) / n] that step i covers; diffusers' `control_guidance_start/end` run a
  ControlNet on step i when the whole interval lies inside [start, end] (`inside_span`), and ControlNet parity
  with diffusers needs that rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPosition:
    index: int  # 0-based step index
    steps: int  # steps in the run

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 <= self.index < self.steps:
            raise ValueError(f"step {self.index} is outside a run of {self.steps} steps")

    @property
    def progress(self) -> float:
        """i / (n - 1) in [0, 1]; 0 for a one-step run."""
        return 0.0 if self.steps <= 1 else self.index / (self.steps - 1)

    def within(self, start: float, end: float) -> bool:
        """Whether `progress` lies in [start, end]."""
        return start <= self.progress <= end

    @property
    def span(self) -> tuple[float, float]:
        return self.index / self.steps, (self.index + 1) / self.steps

    def inside_span(self, start: float, end: float) -> bool:
        """diffusers' ControlNet rule: the step's whole interval [i/n, (i+1)/n] lies in [start, end]."""
        lo, hi = self.span
        return not (lo < start or hi > end)
