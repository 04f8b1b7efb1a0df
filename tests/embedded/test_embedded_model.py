"""The shipped embedded model: its files are in FLUX.1's real formats and small, and on a CPU it draws
held-out captions (never trained on) that the evaluator can check for colour, shape, size and position,
sampling through flux_sampler with the files loaded by flux_models."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from safetensors import safe_open

from evaluation.adherence import Adherence, score_image, summarise
from evaluation.benchmark import CAPTION_SEED, NOISE_SEED
from evaluation.embedded import EMBEDDED_DIR, FILES, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from flux_sampler.guidance import GuidanceCurve
from training.shapes import held_out_captions

CI_CAPTIONS = 8
MAX_TOTAL_BYTES = 30_000_000
# The shipped model scores 0.63 on these 8 captions (0.60 over 50, docs/embedded_model.md); this floor
# catches a broken loader, sampler or file. Noise-like output scores about 0.2 (background only).
REGRESSION_FLOOR = 0.55
TARGET = 0.75  # issue 5's CI target, not reached yet


def _keys(role: str) -> dict[str, tuple[int, ...]]:
    with safe_open(os.path.join(EMBEDDED_DIR, FILES[role]), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_files_are_in_flux1_layouts_and_small():
    total = sum(os.path.getsize(os.path.join(EMBEDDED_DIR, name)) for name in FILES.values())
    assert total <= MAX_TOTAL_BYTES
    flux = _keys("transformer")
    assert flux["double_blocks.0.img_attn.norm.query_norm.scale"] == (128,)  # FLUX.1's head width
    assert "guidance_in.in_layer.weight" in flux and "single_blocks.0.linear1.weight" in flux
    assert flux["img_in.weight"][1] == 64  # 16 latent channels x 2x2 patches
    t5, clip = _keys("t5"), _keys("clip_l")
    assert t5["shared.weight"][0] == 32128 and "encoder.final_layer_norm.weight" in t5
    assert clip["text_model.embeddings.token_embedding.weight"][0] == 49408
    vae = _keys("vae")
    assert vae["taesd_decoder.1.weight"][1] == 16 and vae["taesd_encoder.14.weight"][0] == 16


@pytest.fixture(scope="module")
def ci_results(embedded_pipeline) -> tuple[list[Adherence], float]:
    captions = held_out_captions(CI_CAPTIONS, CAPTION_SEED)
    start = time.monotonic()
    images = embedded_pipeline.generate(captions, [NOISE_SEED + i for i in range(len(captions))],
                                        RECOMMENDED_STEPS, GuidanceCurve.constant(RECOMMENDED_GUIDANCE))
    seconds = time.monotonic() - start
    return [score_image(img, cap) for img, cap in zip(images, captions, strict=True)], seconds


def test_held_out_captions_are_drawn_above_the_regression_floor(ci_results):
    results, seconds = ci_results
    summary = summarise(results)
    assert summary["adherence"] >= REGRESSION_FLOOR, [(r.caption, round(r.score, 2)) for r in results]
    assert summary["background"] == 1.0 and summary["colour"] >= 0.6
    assert seconds < 120, f"8 captions took {seconds:.0f} s on this CPU"


@pytest.mark.xfail(strict=True, reason="issue 5 asks >= 75 %; the shipped model reaches 63 % here and needs "
                                       "longer training (docs/embedded_model.md)")
def test_held_out_captions_reach_the_issue_target(ci_results):
    results, _ = ci_results
    assert np.mean([r.score for r in results]) >= TARGET
