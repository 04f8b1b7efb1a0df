"""The shipped embedded model: its files are in FLUX.1's real formats and small, and on a CPU it draws
held-out captions (never trained on) that the evaluator can check for colour, shape, size and position,
sampling through flux_sampler with the files loaded by flux_models."""

from __future__ import annotations

import os
import time

import pytest
from safetensors import safe_open

from evaluation.adherence import Adherence, score_image, summarise
from evaluation.benchmark import CAPTION_SEED, NOISE_SEED
from evaluation.embedded import EMBEDDED_DIR, FILES, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from fluxworks.flux_sampler.guidance import GuidanceCurve
from training.shapes import held_out_captions

CI_CAPTIONS = 8
MAX_TOTAL_BYTES = 30_000_000
TARGET = 0.75  # issue 5: 8 held-out captions on a CPU score at least 75 % (the model scores 96 % over 50)


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


def test_held_out_captions_reach_the_adherence_target(ci_results):
    results, seconds = ci_results
    summary = summarise(results)
    assert summary["adherence"] >= TARGET, [(r.caption, round(r.score, 2)) for r in results]
    assert summary["background"] == 1.0 and summary["colour"] >= 0.9
    assert seconds < 120, f"8 captions took {seconds:.0f} s on this CPU"
