"""What the FluxWorks Speed node's fp8 matmul options cost in quality on the trained embedded model.

Why: random 12B weights (bench/node_bench.py) give the speed of each fp8 option and its final-latent error, but
random activations have no outliers, so they cannot show what one scale per tensor (tensorwise weights,
calibrated activation scales that clamp larger values) costs on a trained model's activations. The embedded model
is trained, so its activations have the uneven channels and tokens of a real one; adherence can be read too.

Each fp8 configuration samples the same captions and noise seeds, one caption per run (calibration measures one
image's activations, as for a user's single image), through `EmbeddedPipeline.sample(..., speed=...)`, i.e.
`flux_speed.prepare.sample_prepared`, the FluxWorks Sampler's own path. On the CPU the fp8 arithmetic is the GPU's
emulated in float32 (flux_speed.fp8_linear; fast accumulation is a GPU-only GEMM feature and is not emulated).
Compared with the same runs without fp8 (fp32): final-latent relative error per image (mean, max) and adherence.

    PYTHONPATH=. python -m evaluation.fp8_quality --split validation --json docs/bench/FILE.json
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from unittest import mock

import torch

from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_speed.prepare import SpeedOptions

from .adherence import EVALUATOR
from .benchmark import score_latents
from .cache_quality import relative_errors
from .cli import start, sweep_parser, write_report
from .embedded import RECOMMENDED_GUIDANCE, RECOMMENDED_T5_LENGTH, EmbeddedPipeline
from .splits import noise_seeds, split_captions

logger = logging.getLogger(__name__)

STEPS = 28
# The two fp8 settings the node has offered as defaults: per-row/per-token scales with per-call activation amax,
# and one scale per tensor with activation scales calibrated on the first step.
CONFIGS = {
    "rowwise_dynamic": SpeedOptions(fp8_matmul=True, fp8_scaling="rowwise", fp8_activations="dynamic"),
    "tensorwise_calibrated": SpeedOptions(fp8_matmul=True, fp8_scaling="tensorwise", fp8_activations="calibrated"),
}


def sample_one_by_one(pipeline: EmbeddedPipeline, captions: list[str], seeds: list[int], steps: int,
                      guidance: float, speed: SpeedOptions | None) -> torch.Tensor:
    curve = GuidanceCurve.constant(guidance)
    latents = [pipeline.sample([c], [s], steps, curve, speed=speed).latents
               for c, s in zip(captions, seeds, strict=True)]
    return torch.cat(latents)


def quality_report(pipeline: EmbeddedPipeline, split: str, count: int, names: list[str], steps: int = STEPS,
                   guidance: float = RECOMMENDED_GUIDANCE) -> dict:
    captions, seeds = split_captions(split, count), noise_seeds(count)
    reference = sample_one_by_one(pipeline, captions, seeds, steps, guidance, None)
    _, reference_summary = score_latents(pipeline, reference, captions)
    report = {"evaluator": EVALUATOR, "split": split, "captions": captions, "seeds": seeds, "steps": steps,
              "guidance": guidance, "t5_length": RECOMMENDED_T5_LENGTH, "batch": 1, "device": str(pipeline.device),
              "arithmetic": "fp8 e4m3 quantisation emulated in float32 on the CPU (flux_speed.fp8_linear)",
              "path": "EmbeddedPipeline.sample -> flux_speed.prepare.sample_prepared (FluxWorks Sampler path)",
              "reference": {"speed": "none (fp32 matmul)", "adherence": reference_summary}, "rows": []}
    logger.info("fp32: adherence %.4f", reference_summary["adherence"])
    for name in names:
        start = time.monotonic()
        speed = CONFIGS[name]
        # Let `prepare` quantise on the CPU, where Fp8Linear emulates the GPU's fp8 arithmetic.
        with mock.patch("fluxworks.flux_speed.prepare.fp8_matmul_supported", return_value=True):
            latents = sample_one_by_one(pipeline, captions, seeds, steps, guidance, speed)
        errors = relative_errors(latents, reference)
        _, summary = score_latents(pipeline, latents, captions)
        row = {"name": name, "speed": asdict(speed), "latent_rel_error_mean": round(float(errors.mean()), 6),
               "latent_rel_error_max": round(float(errors.max()), 6), "adherence": summary,
               "seconds": round(time.monotonic() - start, 1)}
        logger.info("%s: error mean %.5f max %.5f, adherence %.4f", name, row["latent_rel_error_mean"],
                    row["latent_rel_error_max"], summary["adherence"])
        report["rows"].append(row)
    return report


def main() -> None:
    parser = sweep_parser(__doc__.splitlines()[0], STEPS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    pipeline = start(args)
    write_report(args.json, quality_report(pipeline, args.split, args.captions, names, args.steps, args.guidance))


if __name__ == "__main__":
    main()
