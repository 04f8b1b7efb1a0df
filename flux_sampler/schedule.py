"""Flow-matching sigma schedules for FLUX.1, following BFL's `sampling.get_schedule` and diffusers'
`FlowMatchEulerDiscreteScheduler` (dynamic shifting), so both can be diffed against this file."""

from __future__ import annotations

import math

import torch

BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """Exponential time shift of rectified-flow timesteps (SD3 paper, eq. 23; BFL `time_shift`)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def calculate_mu(
    image_seq_len: int,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """Resolution-dependent shift: a line through (256 tokens, 0.5) and (4096 tokens, 1.15) (BFL dev)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def image_seq_len(latent_height: int, latent_width: int) -> int:
    """Number of 2x2 latent patches the transformer sees for a latent of this size."""
    return (latent_height // 2) * (latent_width // 2)


def get_sigmas(steps: int, mu: float | None = None, denoise: float = 1.0) -> torch.Tensor:
    """`steps + 1` sigmas from 1 to 0 (float32); shifted by `mu` when given (dev), unshifted when None.

    With `denoise < 1` (img2img) the schedule is computed for `round(steps / denoise)` steps and only its
    last `steps + 1` values are kept, as ComfyUI's KSampler does.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = steps if denoise >= 1.0 else max(steps, int(round(steps / denoise)))
    t = torch.linspace(1.0, 0.0, total + 1, dtype=torch.float64)
    if mu is not None:
        inner = t[:-1]
        t = torch.cat([time_shift(mu, 1.0, inner), t[-1:]])
    return t[-(steps + 1):].to(torch.float32)


def shift_to_mu(shift: float) -> float:
    """An SD3-style constant shift factor s (sigma' = s*t / (1 + (s-1)*t)) is the time shift with mu = ln s."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return math.log(shift)
