"""The step cache on the trained embedded model: switched off by its threshold it changes nothing, switched
on it skips steps and still draws pictures, and the benchmark reports its reuse and error against the same
setting without cache."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch

from evaluation.benchmark import NOISE_SEED, Setting, run
from evaluation.cache_quality import relative_errors
from evaluation.step_cache_curve import reuse_bound
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_speed.step_cache import StepCacheConfig
from training.shapes import held_out_captions

CAPTIONS = held_out_captions(2, 1234)
SEEDS = [NOISE_SEED + i for i in range(len(CAPTIONS))]
STEPS = 6
CURVE = GuidanceCurve.constant(2.0)


@pytest.fixture(scope="module")
def uncached(embedded_pipeline):
    return embedded_pipeline.sample(CAPTIONS, SEEDS, STEPS, CURVE)


def test_threshold_zero_reproduces_the_uncached_images_exactly(embedded_pipeline, uncached):
    cached = embedded_pipeline.sample(CAPTIONS, SEEDS, STEPS, CURVE, cache=StepCacheConfig(threshold=0.0))
    assert uncached.cache is None
    assert cached.cache is not None and (cached.cache.reused, cached.cache.calls) == (0, STEPS)
    assert torch.equal(cached.latents, uncached.latents)
    np.testing.assert_array_equal(cached.images, uncached.images)
    images = embedded_pipeline.generate(CAPTIONS, SEEDS, STEPS, CURVE, cache=StepCacheConfig(threshold=0.0))
    np.testing.assert_array_equal(images, uncached.images)


def test_large_threshold_reuses_steps_and_still_draws(embedded_pipeline, uncached):
    config = StepCacheConfig(threshold=10.0, start_percent=0.0, end_percent=1.0, max_consecutive=2)
    first = embedded_pipeline.sample(CAPTIONS, SEEDS, STEPS, CURVE, cache=config)
    second = embedded_pipeline.sample(CAPTIONS, SEEDS, STEPS, CURVE, cache=config)
    assert first.cache is not None and first.cache.calls == STEPS
    assert 0 < first.cache.reused < STEPS
    assert second.cache == first.cache  # a fresh cache state per run: nothing carries over
    assert first.images.shape == uncached.images.shape and first.images.dtype == np.uint8
    assert all(img.std() > 10 for img in first.images)  # pictures, not flat fields
    errors = relative_errors(first.latents, uncached.latents)
    assert np.isfinite(errors).all() and (errors > 0).all()


def test_benchmark_cache_row_reports_reuse_and_error(embedded_pipeline, tmp_path):
    cached = Setting("cache row", 2, CURVE, None, ("cache",), StepCacheConfig(10.0, 0.0, 1.0, 1))
    report = run(embedded_pipeline, CAPTIONS, [cached], str(tmp_path / "r.json"), None)
    [row] = report["settings"]
    assert row["cache"]["threshold"] == 10.0 and row["t5_length"] == 128
    assert (row["cache_reused_calls"], row["cache_calls"], row["cache_reused_share"]) == (1, 2, 0.5)
    assert row["latent_rel_error_mean"] > 0 and row["latent_rel_error_max"] >= row["latent_rel_error_mean"]
    assert 0.0 <= row["adherence_no_cache"] <= 1.0 and row["pixel_mean_abs_diff"] > 0


MONOTONE_STEPS = 28  # the step count of the measured curve (docs/bench/embedded_step_cache_validation_2026-12-01.json)
MONOTONE_THRESHOLDS = (0.0, 0.002, 0.004, 0.01, 0.05)


def test_reuse_moves_monotonically_across_the_threshold_range(embedded_pipeline):
    """The threshold sets the reuse: with the node's window and cap, reuse grows step by step from none to most
    steps as the threshold grows, the smallest nonzero threshold reuses something without reaching the cap's bound
    (so the cap alone does not decide, which would be fixed skipping), and the latent error grows with it."""
    uncached = embedded_pipeline.sample(CAPTIONS[:1], SEEDS[:1], MONOTONE_STEPS, CURVE)
    reused, errors = [], []
    for threshold in MONOTONE_THRESHOLDS:
        config = replace(StepCacheConfig(), threshold=threshold)
        cached = embedded_pipeline.sample(CAPTIONS[:1], SEEDS[:1], MONOTONE_STEPS, CURVE, cache=config)
        reused.append(cached.cache.reused)
        errors.append(float(relative_errors(cached.latents, uncached.latents)[0]))
    assert reused[0] == 0 and errors[0] == 0.0
    assert all(a < b for a, b in pairwise(reused)), reused  # strictly more reuse at every larger threshold
    assert reused[-1] <= reuse_bound(StepCacheConfig(), MONOTONE_STEPS)
    assert 0 < reused[1] < reuse_bound(StepCacheConfig(), MONOTONE_STEPS) // 2, reused
    assert errors[1] < errors[-1], errors
