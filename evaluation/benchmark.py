"""Adherence of the embedded model over held-out captions, for a set of sampler settings: steps and constant
guidance, scheduled guidance, true CFG with a negative prompt, the step cache (compared with the same setting
without cache) and T5 length 512. Writes a JSON report and a picture grid.

Settings are chosen on the validation captions and reported on the test captions (evaluation/splits.py):

    python -m evaluation.benchmark --split validation --tags sweep,t5_512 --json validation.json
    python -m evaluation.benchmark --split test --tags recommended --seeds 2 --json test.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_speed.step_cache import StepCacheConfig
from training.shapes import parse_caption, render, render_batch

from .adherence import EVALUATOR, Adherence, colour_share, score_image, summarise
from .cache_quality import cache_sweep, cache_to_dict, compare_to_reference, describe
from .embedded import (
    EMBEDDED_DIR,
    RECOMMENDED_GUIDANCE,
    RECOMMENDED_STEPS,
    RECOMMENDED_T5_LENGTH,
    EmbeddedPipeline,
    Generation,
)
from .splits import CAPTION_SEED, NOISE_SEED, SPLITS, noise_seeds, split_captions

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Setting:
    name: str
    steps: int
    curve: GuidanceCurve
    negative: str | None = None
    tags: tuple[str, ...] = field(default=())
    cache: StepCacheConfig | None = None
    t5_length: int = RECOMMENDED_T5_LENGTH

    def without_cache(self) -> Setting:
        """The same sampling without step cache: the reference a cached row is compared with."""
        return replace(self, name=f"reference without cache of {self.name!r}", tags=(), cache=None)

    def sampling_key(self) -> tuple:
        """Settings with equal keys sample the same images (the name and tags are labels only)."""
        return (self.steps, self.curve, self.negative, self.t5_length, self.cache)


def constant(g: float, steps: int, tags: tuple[str, ...] = ("sweep",)) -> Setting:
    """Constant guidance; the recommended pair (evaluation/embedded.py) also carries the tag "recommended",
    the one row reported on the test captions."""
    if (g, steps) == (RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS):
        tags = (*tags, "recommended")
    return Setting(f"constant g={g:g}, {steps} steps", steps, GuidanceCurve.constant(g), None, tags)


def default_settings(steps: int = 20, guidance: float = 3.5) -> list[Setting]:
    """The sweep, schedules and true-CFG settings docs/embedded_model.md reports."""
    sweep = [constant(g, s) for s in (steps, 8, 12, 28) for g in (1.0, 2.0, 3.5, 5.0)]
    scheduled = [
        Setting(f"linear 5->1.5, {steps} steps", steps, GuidanceCurve(5.0, 1.5, "linear"), None, ("schedule",)),
        Setting(f"linear 1.5->5, {steps} steps", steps, GuidanceCurve(1.5, 5.0, "linear"), None, ("schedule",)),
        Setting(f"cosine 5->2, {steps} steps", steps, GuidanceCurve(5.0, 2.0, "cosine"), None, ("schedule",)),
        Setting(f"step 5->1 at 50%, {steps} steps", steps, GuidanceCurve(5.0, 1.0, "step"), None, ("schedule",)),
    ]
    cfg = [
        Setting(f"true CFG {s:g} neg 'red', g={guidance:g}, {steps} steps", steps,
                GuidanceCurve(guidance, guidance, cfg_scale=s), "red", ("cfg",))
        for s in (1.5, 3.0)
    ] + [
        Setting(f"true CFG 3 neg 'red' first 50%, g={guidance:g}, {steps} steps", steps,
                GuidanceCurve(guidance, guidance, cfg_scale=3.0, cfg_end_percent=0.5), "red", ("cfg",)),
    ] + [
        # True CFG as it is used on FLUX.1-dev: distilled guidance 1, the CFG scale does the guiding. The
        # empty negative is the control that separates "CFG" from "the negative prompt 'red'".
        Setting(f"true CFG {s:g} neg {neg!r}, g=1, {steps} steps", steps,
                GuidanceCurve(1.0, 1.0, cfg_scale=s), neg, ("cfg",))
        for s, neg in ((1.5, "red"), (2.0, "red"), (3.0, "red"), (2.0, ""))
    ]
    return sweep[:4] + scheduled + cfg + sweep[4:] + cache_settings() + [t5_512_setting()]


def cache_settings(steps: int = 28, guidance: float = RECOMMENDED_GUIDANCE) -> list[Setting]:
    """The step cache sweep at the recommended guidance, from never reusing to reusing most steps; each row
    is compared with the same setting without cache (in the sweep above, else sampled for the comparison)."""
    curve = GuidanceCurve.constant(guidance)
    return [Setting(f"{describe(c)}, g={guidance:g}, {steps} steps", steps, curve, None, ("cache",), c)
            for c in cache_sweep()]


def t5_512_setting() -> Setting:
    """The recommended settings with 512 T5 tokens: the model trains mostly at 128 (15 % of batches at 512)."""
    return Setting(f"constant g={RECOMMENDED_GUIDANCE:g}, {RECOMMENDED_STEPS} steps, T5 length 512",
                   RECOMMENDED_STEPS, GuidanceCurve.constant(RECOMMENDED_GUIDANCE), None, ("t5_512",),
                   t5_length=512)


def _mentions_red(caption: str) -> bool:
    scene = parse_caption(caption)
    return any(o.colour == "red" for o in scene.objects) or scene.background == "red"


def _red_share(images: np.ndarray) -> float:
    """Mean share of red pixels (a direct read of what a 'red' negative prompt should remove)."""
    return float(np.mean([colour_share(img, "red") for img in images]))


def sample_setting(pipeline: EmbeddedPipeline, captions: list[str], setting: Setting,
                   batch: int = 25, repeats: int = 1) -> Generation:
    """All captions of one setting, `batch` at a time, `repeats` samples per caption (repeat r of caption i from
    `noise_seeds(...)`; images ordered repeat by repeat); with a cache, each batch is a fresh run and the counts
    are summed."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    runs = []
    for repeat in range(repeats):
        seeds = noise_seeds(len(captions), repeat)
        for i in range(0, len(captions), batch):
            runs.append(pipeline.sample(captions[i:i + batch], seeds[i:i + batch], setting.steps, setting.curve,
                                        setting.negative, setting.t5_length, cache=setting.cache))
    counts = [r.cache for r in runs if r.cache is not None]
    return Generation(np.concatenate([r.images for r in runs]), torch.cat([r.latents for r in runs]),
                      sum(counts[1:], counts[0]) if counts else None)


def evaluate_setting(pipeline: EmbeddedPipeline, captions: list[str], setting: Setting, batch: int = 25,
                     reference: Generation | None = None, repeats: int = 1) -> tuple[dict, Generation]:
    """Summary of one setting over `captions` x `repeats` seeds (overall, per seed, captions with / without
    red) and its generation; a cached setting also reports reuse and error against `reference` (the same
    setting without cache, sampled with the same repeats)."""
    if setting.cache is not None and reference is None:
        raise ValueError(f"{setting.name!r} uses the step cache: pass the generation without cache as reference")
    start = time.monotonic()
    generation = sample_setting(pipeline, captions, setting, batch, repeats)
    seconds = time.monotonic() - start
    images = generation.images
    captions = captions * repeats  # the images are ordered repeat by repeat
    results = [score_image(img, cap) for img, cap in zip(images, captions, strict=True)]
    per_seed = [summarise(results[r * len(results) // repeats:(r + 1) * len(results) // repeats])["adherence"]
                for r in range(repeats)]
    red = [r for r, c in zip(results, captions, strict=True) if _mentions_red(c)]
    other = [r for r, c in zip(results, captions, strict=True) if not _mentions_red(c)]
    summary = {
        "setting": setting.name, "tags": list(setting.tags), "steps": setting.steps,
        "curve": setting.curve.to_dict(), "negative": setting.negative, "t5_length": setting.t5_length,
        "cache": cache_to_dict(setting.cache) if setting.cache is not None else None,
        **summarise(results),
        "repeats": repeats,
        "adherence_per_seed": per_seed,
        "image_scores": [round(r.score, 4) for r in results],  # caption i of repeat r at index r * len(captions) + i
        "image_extra_objects": [len(r.extra_objects) for r in results],
        "adherence_red_captions": summarise(red)["adherence"] if red else None,
        "adherence_other_captions": summarise(other)["adherence"] if other else None,
        "red_pixel_share_other_captions": _red_share(
            np.stack([img for img, c in zip(images, captions, strict=True) if not _mentions_red(c)])) if other else None,
    }
    if setting.cache is not None:
        reference_results = [score_image(img, cap) for img, cap in zip(reference.images, captions, strict=True)]
        summary.update(compare_to_reference(generation, reference),
                       adherence_no_cache=summarise(reference_results)["adherence"])
    summary["seconds"] = round(seconds, 2)
    logger.info("%-50s adherence %.3f (recall %.3f precision %.3f) exact %.2f%s", setting.name,
                summary["adherence"], summary["recall"], summary["precision"], summary["exact"], _cache_log(summary))
    return summary, generation


def _cache_log(summary: dict) -> str:
    if summary["cache"] is None:
        return ""
    return (f" reused {summary['cache_reused_calls']}/{summary['cache_calls']}"
            f" latent error {summary['latent_rel_error_mean']:.4f}")


def reference_scores(pipeline: EmbeddedPipeline, captions: list[str]) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Adherence of clean renders of the captions (evaluator sanity) and of their VAE round trips (what the
    generator could reach with this VAE)."""
    rng = np.random.default_rng(CAPTION_SEED)
    renders = np.stack([render(parse_caption(c), rng) for c in captions])
    recon = round_trip(pipeline, renders)
    return (summarise([score_image(i, c) for i, c in zip(renders, captions, strict=True)]),
            summarise([score_image(i, c) for i, c in zip(recon, captions, strict=True)]), renders, recon)


def round_trip(pipeline: EmbeddedPipeline, images: np.ndarray, batch: int = 25) -> np.ndarray:
    return np.concatenate([pipeline.reconstruct(images[i:i + batch]) for i in range(0, len(images), batch)])


def evaluator_false_positives(pipeline: EmbeddedPipeline, count: int, seed: int = 8) -> dict:
    """The evaluator's own error on pictures that are right: `count` training-distribution renders (chunk 0 of
    `render_batch(seed)`) through the VAE and back. Every extra object found there is a false positive (VAE
    blur and colour bleeding read as an object), every failed check a false negative. (Seed 7 was used to
    design the edge margin of evaluation/adherence.py, so the default checks it on other images.)"""
    renders, captions = render_batch(seed, 0, count)
    results = [score_image(i, c) for i, c in zip(round_trip(pipeline, renders), captions, strict=True)]
    return {"images": count, "render_batch_seed": seed,
            "extra_objects": sum(len(r.extra_objects) for r in results),
            "images_with_extra_objects": sum(bool(r.extra_objects) for r in results),
            "summary": summarise(results)}


def score_latents(pipeline: EmbeddedPipeline, latents: torch.Tensor | list[torch.Tensor],
                  captions: list[str]) -> tuple[list[Adherence], dict]:
    """Decode final latents with the embedded VAE and score each against its caption: per-image results and
    their summary. `latents` are raw VAE-space latents (N, 16, H/8, W/8), as `Generation.latents` and a core
    LATENT's "samples" (after core's process_latent_out) are; one tensor or a list of (1 or more)-image tensors."""
    stacked = torch.cat([t if t.ndim == 4 else t[None] for t in latents]) if isinstance(latents, list) else latents
    if stacked.ndim != 4 or stacked.shape[1] != 16:
        raise ValueError(f"expected raw VAE-space latents of shape (N, 16, h, w), got {tuple(stacked.shape)}")
    if stacked.shape[0] != len(captions):
        raise ValueError(f"{stacked.shape[0]} latents but {len(captions)} captions")
    images = np.concatenate([pipeline.decode(stacked[i:i + 25]) for i in range(0, len(stacked), 25)])
    results = [score_image(img, cap) for img, cap in zip(images, captions, strict=True)]
    return results, summarise(results)


def picture_grid(rows: list[np.ndarray], labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """Rows of equally sized (N, H, W, 3) images side by side, optional label strip under each row."""
    tiles = [np.concatenate(list(r), axis=1) for r in rows]
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    if labels:
        strip = 14
        out = Image.new("RGB", (grid.width, grid.height + strip * len(labels)), (255, 255, 255))
        out.paste(grid, (0, 0))
        draw = ImageDraw.Draw(out)
        for i, text in enumerate(labels):
            draw.text((4, grid.height + i * strip + 1), text, fill=(0, 0, 0))
        grid = out
    return grid


def _write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


def run(pipeline: EmbeddedPipeline, captions: list[str], settings: list[Setting], json_path: str,
        grid_path: str | None, grid_setting: int = 0, repeats: int = 1, split: str | None = None,
        false_positive_images: int = 0) -> dict:
    """Evaluate every setting; the JSON report is rewritten after each one, so a cut-off run keeps its part.
    The generations without cache that a cached row is compared with are kept (latents and images).
    `split` only labels the report; `false_positive_images` > 0 adds `evaluator_false_positives`."""
    truth, recon, renders, recon_images = reference_scores(pipeline, captions)
    report = {"evaluator": EVALUATOR, "split": split, "repeats": repeats,
              "noise_seeds": f"caption i, repeat r: {NOISE_SEED} + 1000 r + i (evaluation/splits.py)",
              "device": str(pipeline.device), "compute_dtype": str(pipeline.compute_dtype), "captions": captions,
              "reference": {"clean_renders": truth, "vae_round_trip": recon}, "settings": []}
    if false_positive_images:
        report["reference"]["evaluator_false_positives"] = evaluator_false_positives(pipeline, false_positive_images)
    needed = {s.without_cache().sampling_key() for s in settings if s.cache is not None}
    uncached: dict[tuple, Generation] = {}
    for index, setting in enumerate(settings):
        reference = None
        if setting.cache is not None:
            plain = setting.without_cache()
            if plain.sampling_key() not in uncached:
                logger.info("sampling %r as the reference of the cached rows", plain.name)
                uncached[plain.sampling_key()] = sample_setting(pipeline, captions, plain, repeats=repeats)
            reference = uncached[plain.sampling_key()]
        summary, generation = evaluate_setting(pipeline, captions, setting, reference=reference, repeats=repeats)
        if setting.sampling_key() in needed:
            uncached[setting.sampling_key()] = generation
        report["settings"].append(summary)
        _write_json(report, json_path)
        if grid_path and index == grid_setting:
            n = min(10, len(captions))
            picture_grid([renders[:n], recon_images[:n], generation.images[:n]],
                         [f"rows: render, VAE round trip, {setting.name}"]).save(grid_path)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=EMBEDDED_DIR)
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    parser.add_argument("--split", choices=SPLITS, default="validation",
                        help="validation: for choosing settings; test: for reporting only")
    parser.add_argument("--captions", type=int, default=50, help="the first N captions of the split")
    parser.add_argument("--seeds", type=int, default=1, help="noise seeds per caption")
    parser.add_argument("--false-positive-images", type=int, default=0,
                        help="also measure the evaluator on this many VAE round trips of training renders")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="benchmark.json")
    parser.add_argument("--grid", default=None)
    parser.add_argument("--quick", action="store_true", help="three 2-step settings only (smoke runs)")
    parser.add_argument("--tags", default=None,
                        help="comma-separated tags: only the settings with one of them (e.g. cache,t5_512)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = benchmark(args.models, (args.clip_tokenizer, args.t5_tokenizer), args.captions, args.device,
                       args.json, args.grid, args.quick, tuple(args.tags.split(",")) if args.tags else None,
                       args.split, args.seeds, args.false_positive_images)
    logger.info("reference: %s", report["reference"])


def benchmark(models: str, tokenizer_folders: tuple[str, str], count: int, device: str, json_path: str,
              grid_path: str | None, quick: bool = False, tags: tuple[str, ...] | None = None,
              split: str = "validation", repeats: int = 1, false_positive_images: int = 0) -> dict:
    """Load `models`, run the settings over the first `count` captions of `split`, write the JSON report (fp32
    compute). `tags` keeps only the settings carrying one of them ("recommended" is the test split's row)."""
    captions = split_captions(split, count)
    pipeline = EmbeddedPipeline.load(tokenizer_folders, models, device)
    settings = default_settings()
    if quick:
        settings = [constant(3.5, 2), Setting("quick true CFG", 2, GuidanceCurve(3.5, 3.5, cfg_scale=3.0), "red"),
                    Setting("quick cache", 2, GuidanceCurve.constant(3.5), None, ("cache",),
                            StepCacheConfig(1.0, 0.0, 1.0, 1))]
    if tags is not None:
        settings = [s for s in settings if set(s.tags) & set(tags)]
        if not settings:
            raise ValueError(f"no benchmark setting carries any of the tags {tags}")
    grid_setting = next((i for i, s in enumerate(settings) if "recommended" in s.tags), 0)
    return run(pipeline, captions, settings, json_path, grid_path, grid_setting, repeats, split, false_positive_images)


if __name__ == "__main__":
    main()
