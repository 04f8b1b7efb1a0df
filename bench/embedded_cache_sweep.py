"""Step-cache reuse and quality across thresholds on the trained embedded model (CPU): does reuse follow the
threshold, and what does each threshold cost in final-latent error?

Each validation caption is sampled alone (batch 1, as a user samples; the cache decides per batch) through the
FluxWorks Sampler's own path (`EmbeddedPipeline.sample` -> `sample_prepared`), with and without the cache, at the
recommended settings unless --steps says otherwise. Two windows per threshold: the node's default window
(10-90 %, at most 3 reuses in a row) and the whole run (0-100 %, no practical cap).

Usage (repo root): .venv/bin/python -m bench.embedded_cache_sweep --steps 12 --captions 12 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from evaluation.embedded import EmbeddedPipeline
from evaluation.splits import validation_captions
from fluxworks.flux_speed.step_cache import StepCacheConfig
from tests.paths import tokenizer_folders

THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
WINDOWS = (((0.1, 0.9), 3), ((0.0, 1.0), 11))


def sweep(steps: int, count: int, thresholds=THRESHOLDS) -> dict:
    pipe = EmbeddedPipeline.load(tokenizer_folders())
    captions = validation_captions(count)

    def run(cache: StepCacheConfig | None):
        latents, reused, calls = [], 0, 0
        for seed, caption in enumerate(captions):
            generation = pipe.sample([caption], [seed], steps=steps, cache=cache)
            latents.append(generation.latents)
            if generation.cache is not None:
                reused, calls = reused + generation.cache.reused, calls + generation.cache.calls
        return torch.cat(latents), reused, calls

    reference, _, _ = run(None)
    rows = []
    for threshold in thresholds:
        for (start, end), most in WINDOWS:
            latents, reused, calls = run(StepCacheConfig(threshold, start, end, most))
            err = (latents - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
            rows.append(dict(threshold=threshold, start_percent=start, end_percent=end, max_consecutive=most,
                             reused=reused, calls=calls, reused_share=reused / calls,
                             rel_error_mean=float(err.mean()), rel_error_max=float(err.max())))
            logging.info("%s", rows[-1])
    return dict(steps=steps, captions=count, split="validation", batch=1, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--captions", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(sweep(args.steps, args.captions), f, indent=1)


if __name__ == "__main__":
    main()
