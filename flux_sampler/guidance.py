"""Timestep-scheduled guidance: the distilled-guidance value as a curve over sampling progress, plus an
optional true-CFG window in which the negative prompt is evaluated.

Progress is a `StepPosition`'s (flux_sampler/progress.py): step i of n sits at i / (n - 1), so the first step
sees the curve's start and the last step its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .progress import StepPosition

CURVE_SHAPES = ("constant", "linear", "cosine", "exponential", "step")


def step_progress(step: int, steps: int) -> float:
    """Sampling progress of step `step` (0-based) out of `steps`, in [0, 1] (`StepPosition.progress`)."""
    return StepPosition(step, steps).progress


@dataclass(frozen=True)
class GuidanceCurve:
    """Distilled guidance `start_value` -> `end_value` between `start_percent` and `end_percent` of progress.

    Before `start_percent` the value is `start_value`, after `end_percent` it is `end_value`; in between
    the `shape` interpolates: linear, cosine (ease in/out), exponential (geometric, both values > 0) or step
    (jumps at the window's midpoint). True CFG with `cfg_scale` > 1 is applied only for progress inside
    [`cfg_start_percent`, `cfg_end_percent`]; outside it only the positive prompt is evaluated.
    """

    start_value: float = 3.5
    end_value: float = 3.5
    shape: str = "constant"
    start_percent: float = 0.0
    end_percent: float = 1.0
    cfg_scale: float = 1.0
    cfg_start_percent: float = 0.0
    cfg_end_percent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("start_value", "end_value", "cfg_scale"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"guidance {name} is {value}; it must be a finite number (e.g. 3.5)")
        if self.shape not in CURVE_SHAPES:
            raise ValueError(f"guidance curve shape must be one of {CURVE_SHAPES}, got {self.shape!r}")
        for name in ("start_percent", "end_percent", "cfg_start_percent", "cfg_end_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.start_percent > self.end_percent:
            raise ValueError(
                f"start_percent ({self.start_percent}) must not exceed end_percent ({self.end_percent})"
            )
        if self.cfg_start_percent > self.cfg_end_percent:
            raise ValueError(
                f"cfg_start_percent ({self.cfg_start_percent}) must not exceed "
                f"cfg_end_percent ({self.cfg_end_percent})"
            )
        if self.shape == "exponential" and (self.start_value <= 0 or self.end_value <= 0):
            raise ValueError("the exponential shape needs positive start and end values")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be non-negative, got {self.cfg_scale}")

    @classmethod
    def constant(cls, value: float) -> GuidanceCurve:
        return cls(start_value=value, end_value=value, shape="constant")

    def value_at(self, progress: float) -> float:
        """Distilled guidance at `progress` in [0, 1]."""
        if self.shape == "constant":
            return self.start_value
        if progress <= self.start_percent:
            return self.start_value
        if progress >= self.end_percent:
            return self.end_value
        u = (progress - self.start_percent) / (self.end_percent - self.start_percent)
        a, b = self.start_value, self.end_value
        if self.shape == "linear":
            return a + (b - a) * u
        if self.shape == "cosine":
            return a + (b - a) * (1.0 - math.cos(math.pi * u)) / 2.0
        if self.shape == "exponential":
            return a * (b / a) ** u
        return a if u < 0.5 else b  # step

    def cfg_active(self, progress: float) -> bool:
        """Whether the negative prompt is evaluated at `progress` (true CFG inside its window)."""
        return self.cfg_scale != 1.0 and self.cfg_start_percent <= progress <= self.cfg_end_percent

    def values(self, steps: int) -> list[float]:
        """Per-step guidance values for a run of `steps` steps."""
        return [self.value_at(step_progress(i, steps)) for i in range(steps)]

    def to_dict(self) -> dict[str, float | str]:
        return {
            "start_value": self.start_value,
            "end_value": self.end_value,
            "shape": self.shape,
            "start_percent": self.start_percent,
            "end_percent": self.end_percent,
            "cfg_scale": self.cfg_scale,
            "cfg_start_percent": self.cfg_start_percent,
            "cfg_end_percent": self.cfg_end_percent,
        }


def progress_from_sigma(sigmas: torch.Tensor, sigma: torch.Tensor) -> float:
    """Progress of the step whose starting sigma is `sigma` within a schedule `sigmas` (steps + 1 values).

    Only for hosts that hand the model nothing but the current sigma (core's KSampler, through the Schedule Core
    Model node): the sampler passes `sigmas[i]` itself, so the nearest entry *is* the step index i, and the
    progress then comes from the same `StepPosition` the FluxWorks Sampler hands down.
    """
    sigmas = sigmas.detach().flatten().to(torch.float64).cpu()
    value = float(sigma.detach().flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    index = int(torch.argmin((sigmas[:-1] - value).abs()))
    return step_progress(index, len(sigmas) - 1)
