"""The pictures in docs/embedded_model.md: held-out captions (target render, then the model at guidance 1 and
at the recommended settings) and the demo prompt, all sampled on the CPU from the shipped files.

Usage: python -m evaluation.samples --out docs
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
from PIL import Image

from fluxworks.flux_sampler.guidance import GuidanceCurve
from training.shapes import parse_caption, render

from .adherence import score_image
from .benchmark import picture_grid
from .embedded import DEMO_PROMPT, EMBEDDED_DIR, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, EmbeddedPipeline
from .splits import CAPTION_SEED, noise_seeds, validation_captions

logger = logging.getLogger(__name__)


def write_samples(pipeline: EmbeddedPipeline, out_dir: str, count: int = 10, demo_seed: int = 0) -> dict[str, str]:
    """Write the sample sheet and the demo image; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    captions = validation_captions(count)  # pictures only; the test captions stay for reported numbers
    seeds = noise_seeds(count)
    rng = np.random.default_rng(CAPTION_SEED)
    targets = np.stack([render(parse_caption(c), rng) for c in captions])
    plain = pipeline.generate(captions, seeds, RECOMMENDED_STEPS, GuidanceCurve.constant(1.0))
    chosen = pipeline.generate(captions, seeds, RECOMMENDED_STEPS, GuidanceCurve.constant(RECOMMENDED_GUIDANCE))
    scores = [round(score_image(img, cap).score, 2) for img, cap in zip(chosen, captions, strict=True)]
    logger.info("sample sheet scores at the recommended settings: %s", scores)
    sheet = os.path.join(out_dir, "embedded_model_samples.png")
    picture_grid([targets, plain, chosen], [
        "rows: target render of the caption; model, guidance 1; model, recommended "
        f"({RECOMMENDED_STEPS} steps, guidance {RECOMMENDED_GUIDANCE:g}); held-out captions 1-{count} of the "
        "validation split, left to right"], scale=1).save(sheet)
    [demo] = pipeline.generate([DEMO_PROMPT], [demo_seed], RECOMMENDED_STEPS,
                               GuidanceCurve.constant(RECOMMENDED_GUIDANCE))
    demo_path = os.path.join(out_dir, "embedded_model_demo.png")
    Image.fromarray(demo).resize((256, 256), Image.Resampling.NEAREST).save(demo_path)
    logger.info("demo prompt %r, seed %d: score %.2f", DEMO_PROMPT, demo_seed, score_image(demo, DEMO_PROMPT).score)
    return {"samples": sheet, "demo": demo_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=EMBEDDED_DIR)
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pipeline = EmbeddedPipeline.load((args.clip_tokenizer, args.t5_tokenizer), args.models)
    for name, path in write_samples(pipeline, args.out).items():
        logger.info("%s: %s", name, path)


if __name__ == "__main__":
    main()
