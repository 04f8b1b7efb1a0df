"""The FluxWorks step cache's quality/reuse curve on the trained embedded model, in the setting of core's
EasyCache/LazyCache run (evaluation/core_cache.py, docs/bench/embedded_eval_2026-12-01_core_cache.json): the same
captions, noise seeds, steps (28), constant guidance 2 and T5 length 128, one caption per run.

Per cache configuration: the share of transformer evaluations whose deep blocks the cache skipped (its "reuse";
the first block, the embedders and the final layer still run), adherence (evaluator F1) and the final-latent
relative error per image (mean and max) against the same captions and seeds without cache. A configuration
whose reuse on every caption equals the most that its window and `max_consecutive` allow is marked
`fixed_skipping`: its threshold chose nothing.

Sampling goes through `EmbeddedPipeline.sample(..., cache=...)`, i.e. `sample_prepared`, the FluxWorks
Sampler's own path with the options a Step Cache node sets.

    PYTHONPATH=. python -m evaluation.step_cache_curve --split validation --json docs/bench/FILE.json
    PYTHONPATH=. python -m evaluation.step_cache_curve --split test --thresholds 0.1 --json docs/bench/FILE.json
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.progress import StepPosition
from fluxworks.flux_speed.step_cache import StepCacheConfig

from .adherence import EVALUATOR
from .benchmark import score_latents
from .cache_quality import relative_errors
from .cli import start, sweep_parser, write_report
from .embedded import RECOMMENDED_GUIDANCE, RECOMMENDED_T5_LENGTH, EmbeddedPipeline
from .splits import noise_seeds, split_captions

logger = logging.getLogger(__name__)

STEPS = 28  # core_cache.SWEEP_STEPS: the step count of the core EasyCache/LazyCache run
# From no reuse to heavy reuse with the node's window and cap (chosen on the validation captions).
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def reuse_bound(config: StepCacheConfig, steps: int) -> int:
    """The most evaluations one stream can reuse in a run of `steps` under `config`'s window and
    `max_consecutive` whatever the threshold (step 0 always runs in full: there is nothing to reuse yet)."""
    reused, run = 0, 0
    for index in range(1, steps):
        if StepPosition(index, steps).within(config.start_percent, config.end_percent) and run < config.max_consecutive:
            reused, run = reused + 1, run + 1
        else:
            run = 0
    return reused


def sample_one_by_one(pipeline: EmbeddedPipeline, captions: list[str], seeds: list[int], steps: int,
                      guidance: float, cache: StepCacheConfig | None) -> tuple[torch.Tensor, list[int]]:
    """Final latents, each caption sampled alone (the cache decides per batch, as for a user's single image),
    and per caption the number of evaluations that reused the cache."""
    latents, reused = [], []
    curve = GuidanceCurve.constant(guidance)
    for caption, seed in zip(captions, seeds, strict=True):
        generation = pipeline.sample([caption], [seed], steps, curve, cache=cache)
        latents.append(generation.latents)
        if cache is not None:
            if generation.cache is None or generation.cache.calls != steps:
                raise RuntimeError(f"expected {steps} cache decisions, got {generation.cache}")
            reused.append(generation.cache.reused)
    return torch.cat(latents), reused


def curve_report(pipeline: EmbeddedPipeline, split: str, count: int, configs: list[StepCacheConfig],
                 steps: int = STEPS, guidance: float = RECOMMENDED_GUIDANCE) -> dict:
    captions = split_captions(split, count)
    seeds = noise_seeds(count)
    reference, _ = sample_one_by_one(pipeline, captions, seeds, steps, guidance, None)
    _, reference_summary = score_latents(pipeline, reference, captions)
    report = {"evaluator": EVALUATOR, "split": split, "captions": captions, "seeds": seeds, "steps": steps,
              "guidance": guidance, "t5_length": RECOMMENDED_T5_LENGTH, "batch": 1, "device": str(pipeline.device),
              "path": "EmbeddedPipeline.sample -> flux_speed.prepare.sample_prepared (FluxWorks Sampler path)",
              "no_cache": {"adherence": reference_summary}, "rows": []}
    logger.info("no cache: adherence %.4f", reference_summary["adherence"])
    for config in configs:
        start = time.monotonic()
        latents, reused = sample_one_by_one(pipeline, captions, seeds, steps, guidance, config)
        errors = relative_errors(latents, reference)
        _, summary = score_latents(pipeline, latents, captions)
        bound = reuse_bound(config, steps)
        row = {"cache": asdict(config), "reused_per_caption": reused, "reused_mean": round(float(np.mean(reused)), 3),
               "reused_share": round(sum(reused) / (steps * len(captions)), 4), "reuse_bound": bound,
               "fixed_skipping": bool(all(r == bound for r in reused)),
               "latent_rel_error_mean": round(float(errors.mean()), 6),
               "latent_rel_error_max": round(float(errors.max()), 6), "adherence": summary,
               "seconds": round(time.monotonic() - start, 1)}
        logger.info("%s: reused %.3f (%.1f %%)%s, error mean %.4f max %.4f, adherence %.4f", asdict(config),
                    row["reused_mean"], 100 * row["reused_share"], " FIXED" if row["fixed_skipping"] else "",
                    row["latent_rel_error_mean"], row["latent_rel_error_max"], summary["adherence"])
        report["rows"].append(row)
    return report


def main() -> None:
    parser = sweep_parser(__doc__.splitlines()[0], STEPS)
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS))
    parser.add_argument("--start-percent", type=float, default=None, help="window start (default: the node's)")
    parser.add_argument("--end-percent", type=float, default=None, help="window end (default: the node's)")
    parser.add_argument("--max-consecutive", type=int, default=None, help="cap (default: the node's)")
    args = parser.parse_args()
    pipeline = start(args)
    overrides = {k: v for k, v in (("start_percent", args.start_percent), ("end_percent", args.end_percent),
                                   ("max_consecutive", args.max_consecutive)) if v is not None}
    configs = [replace(StepCacheConfig(), threshold=float(t), **overrides) for t in args.thresholds.split(",")]
    write_report(args.json, curve_report(pipeline, args.split, args.captions, configs, args.steps, args.guidance))


if __name__ == "__main__":
    main()
