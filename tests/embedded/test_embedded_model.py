"""The shipped embedded model: its files are in FLUX.1's real formats and small, and on a CPU it draws
test captions (held out of training, and never used to choose settings) that the evaluator can check for
colour, shape, size, position and extra objects, sampling through flux_sampler with the files loaded by
flux_models."""

from __future__ import annotations

import os

import pytest
from safetensors import safe_open

from evaluation.adherence import Adherence, score_image, summarise
from evaluation.embedded import EMBEDDED_DIR, FILES, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from evaluation.splits import noise_seeds, test_captions
from fluxworks.flux_sampler.guidance import GuidanceCurve

CI_CAPTIONS = 8
MAX_TOTAL_BYTES = 30_000_000
# The first 8 test captions from their noise seeds (noise_seeds(8)) score MEASURED at the recommended settings
# on the CPU (docs/bench/embedded_eval_2026-12-01_test.json, evaluator v2). Over 10 noise-seed sets
# (noise_seeds(8, r), r = 0..9) their mean varies with a standard deviation of SPREAD (range 93.1-98.6 %);
# the floor sits 2.9 spreads below the measurement.
MEASURED = 0.958
SPREAD = 0.020
TARGET = 0.90


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
def ci_results(embedded_pipeline) -> list[Adherence]:
    captions = test_captions(CI_CAPTIONS)
    images = embedded_pipeline.generate(captions, noise_seeds(CI_CAPTIONS), RECOMMENDED_STEPS,
                                        GuidanceCurve.constant(RECOMMENDED_GUIDANCE))
    return [score_image(img, cap) for img, cap in zip(images, captions, strict=True)]


def test_test_captions_reach_the_adherence_floor(ci_results):
    summary = summarise(ci_results)
    assert summary["adherence"] >= TARGET, [(r.caption, round(r.score, 2), r.extra_objects) for r in ci_results]
    assert summary["background"] == 1.0 and summary["colour"] >= 0.9
