"""First-block residual cache: when the first double block's image residual barely changes between steps,
the remaining blocks' residual from the last full step is reused (the idea of ParaAttention's First-Block Cache
and TeaCache: consecutive steps of a rectified-flow sampler change slowly in the middle of the schedule).

The decision runs in eager Python between blocks, so it composes with regionally compiled blocks and with
weight-fused LoRAs. State is per prompt stream (positive / negative) and is reset at each new run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepCacheConfig:
    """Reuse when mean|r - r_prev| / mean|r_prev| < `threshold`, only for progress in [start, end]."""

    threshold: float = 0.1
    start_percent: float = 0.1
    end_percent: float = 0.9
    max_consecutive: int = 3  # force a full step after this many reuses, so errors cannot pile up

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"cache window must satisfy 0 <= start <= end <= 1, got "
                             f"{self.start_percent}..{self.end_percent}")
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")


@dataclass
class _Stream:
    first_residual: torch.Tensor | None = None
    rest_residual: torch.Tensor | None = None
    consecutive: int = 0


@dataclass
class StepCacheState:
    """Per-run bookkeeping; `hits` and `misses` tell how many block stacks were skipped and run."""

    config: StepCacheConfig
    streams: dict[tuple, _Stream] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    changes: list[float] = field(default_factory=list)  # measured first-block change per compared step

    def stream(self, key: tuple) -> _Stream:
        return self.streams.setdefault(key, _Stream())

    def can_reuse(self, key: tuple, first_residual: torch.Tensor, progress: float) -> bool:
        s = self.stream(key)
        cfg = self.config
        if (s.first_residual is None or s.rest_residual is None or cfg.threshold == 0
                or not cfg.start_percent <= progress <= cfg.end_percent or s.consecutive >= cfg.max_consecutive
                or s.first_residual.shape != first_residual.shape):
            return False
        prev = s.first_residual
        change = float((first_residual - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        self.changes.append(change)
        return change < cfg.threshold

    def record_hit(self, key: tuple) -> None:
        s = self.stream(key)
        s.consecutive += 1
        self.hits += 1

    def record_full(self, key: tuple, first_residual: torch.Tensor, rest_residual: torch.Tensor) -> None:
        s = self.stream(key)
        s.first_residual, s.rest_residual, s.consecutive = first_residual, rest_residual, 0
        self.misses += 1
