"""What the first-block step cache costs in quality on the trained embedded model: the cache configurations the
benchmark sweeps, and how a cached run is compared with the same run without cache (same captions, seeds,
steps and guidance). Random 12B weights only tell the error of the latents; here adherence can be read too.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from fluxworks.flux_speed.step_cache import StepCacheConfig

from .embedded import Generation

# From (nearly) never reusing to aggressive. With the default window (10-90 % of the schedule, at most 3 reuses
# in a row) a 28-step run can reuse at most 17 steps; the wide-window rows allow 5-6 in a row: 19-21 of 28 on
# the shipped model (threshold 1 reuses whenever the window and max_consecutive allow).
DEFAULT_WINDOW_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
WIDE_WINDOW = (0.05, 0.95)
WIDE_WINDOW_CONFIGS = ((0.3, 5), (0.5, 5), (0.5, 6), (1.0, 6))  # (threshold, max_consecutive)


def cache_sweep() -> list[StepCacheConfig]:
    """The cache configurations of the benchmark's "cache" rows, least to most reuse."""
    start, end = WIDE_WINDOW
    return ([StepCacheConfig(threshold) for threshold in DEFAULT_WINDOW_THRESHOLDS]
            + [StepCacheConfig(threshold, start, end, most) for threshold, most in WIDE_WINDOW_CONFIGS])


def describe(cache: StepCacheConfig) -> str:
    return (f"cache thr={cache.threshold:g} window {cache.start_percent:g}-{cache.end_percent:g} "
            f"max {cache.max_consecutive}")


def cache_to_dict(cache: StepCacheConfig) -> dict[str, float | int]:
    return asdict(cache)


def relative_errors(latents: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per image ||x - x_ref|| / ||x_ref|| of the final VAE-space latents (the measure bench/speed_bench.py
    reports for the 12B model, there over the whole batch)."""
    if latents.shape != reference.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and reference {tuple(reference.shape)} differ in shape")
    diff = (latents.double() - reference.double()).flatten(1).norm(dim=1)
    return (diff / reference.double().flatten(1).norm(dim=1).clamp_min(1e-12)).numpy()


def compare_to_reference(cached: Generation, reference: Generation) -> dict[str, float | int]:
    """The cache columns of a benchmark row: reuse counts, latent error and pixel change vs no cache."""
    if cached.cache is None:
        raise ValueError("the cached generation carries no cache counts (was it sampled with a cache?)")
    errors = relative_errors(cached.latents, reference.latents)
    pixel_diff = np.abs(cached.images.astype(np.int16) - reference.images.astype(np.int16))
    return {
        "cache_reused_calls": cached.cache.reused,
        "cache_calls": cached.cache.calls,
        "cache_reused_share": round(cached.cache.reused_share, 4),
        "latent_rel_error_mean": round(float(errors.mean()), 5),
        "latent_rel_error_max": round(float(errors.max()), 5),
        "pixel_mean_abs_diff": round(float(pixel_diff.mean()), 3),
    }
