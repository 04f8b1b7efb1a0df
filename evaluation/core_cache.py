"""ComfyUI core's own step caches (EasyCache, LazyCache from comfy_extras/nodes_easycache.py) on the trained
embedded model, through core's KSampler, so core's caching can be compared with FluxWorks' step cache on a model
whose pictures can be scored (issue 10, item 7).

The path is core's from end to end except for what core cannot do with this model: core's UNETLoader fixes 24
heads, so the file is read with core's own detection and the head count is set from the width (see
core_sampling_child.py). Then: core ModelPatcher -> ModelSamplingFlux at 128x128 (the shift FluxWorks'
schedule uses for this size: mu = 0.4675) -> EasyCache / LazyCache node -> KSampler (euler, "simple",
cfg 1) with FluxGuidance on the FluxWorks text conditioning, one caption per run, from the same noise as the
FluxWorks sampler (`make_noise(seed)` is core's `prepare_noise(seed)` for a batch of one).

Core runs in a child process (its modules read the process arguments and keep global state); the text
encoding, the reference FluxWorks run and the scoring run here.

    PYTHONPATH=. python -m evaluation.core_cache --captions 50 --json docs/bench/embedded_eval_core_cache.json
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from devtools.paths import PYTHON, comfyui_path
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.schedule import BASE_SHIFT, MAX_SHIFT

from .adherence import EVALUATOR
from .benchmark import score_latents
from .cache_quality import relative_errors
from .cli import start, sweep_parser, write_report
from .embedded import EMBEDDED_DIR, FILES, IMAGE_SIZE, RECOMMENDED_GUIDANCE, RECOMMENDED_T5_LENGTH, EmbeddedPipeline
from .splits import noise_seeds, split_captions

logger = logging.getLogger(__name__)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_sampling_child.py")
CACHE_KINDS = ("EasyCache", "LazyCache")
# Core's node defaults (comfy_extras/nodes_easycache.py): reuse between 15 % and 95 % of the schedule.
DEFAULT_START, DEFAULT_END = 0.15, 0.95
SWEEP_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.4)  # around core's default 0.2, from little reuse to most steps
SWEEP_STEPS = 28  # the step count of the FluxWorks step-cache rows in docs/embedded_model.md


@dataclass(frozen=True)
class CoreCache:
    """One core cache node and its inputs (`kind` is the node id)."""

    kind: str
    reuse_threshold: float
    start_percent: float = DEFAULT_START
    end_percent: float = DEFAULT_END
    # Hand the cache a copy of the model input (see core_sampling_child.copy_input_wrapper): in fp32, core's
    # EasyCache otherwise corrupts the denoised estimate of every step it skips. LazyCache does not need it.
    copy_input: bool = True

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"unknown core cache node {self.kind!r}; use one of {CACHE_KINDS}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"{self.kind}: need 0 <= start_percent <= end_percent <= 1, got "
                             f"{self.start_percent}, {self.end_percent}")

    def label(self) -> str:
        return (f"{self.kind} thr={self.reuse_threshold:g} ({self.start_percent:g}-{self.end_percent:g})"
                f"{'' if self.copy_input else ', input not copied'}")


@dataclass(frozen=True)
class CoreRun:
    """Final raw VAE-space latents (N, 16, h, w) of one core configuration, and per caption how many of the
    `steps` transformer evaluations core really ran (the rest its cache skipped)."""

    cache: CoreCache | None
    latents: torch.Tensor
    transformer_calls: tuple[int, ...]
    steps: int

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(self.steps - c for c in self.transformer_calls)

    @property
    def skipped_share(self) -> float:
        return sum(self.skipped) / (self.steps * len(self.transformer_calls))


def sample_core(pipeline: EmbeddedPipeline, captions: list[str], seeds: list[int], steps: int,
                caches: list[CoreCache | None], guidance: float = RECOMMENDED_GUIDANCE,
                t5_length: int = RECOMMENDED_T5_LENGTH, model_file: str | None = None,
                device: str = "cpu", inference_dtype: str = "float32", timeout_s: float = 3600.0) -> list[CoreRun]:
    """Sample every caption (one KSampler run each, from `make_noise(seed)`) once per entry of `caches` (None =
    plain core) in one core child process, core computing in `inference_dtype` ("float32" or "bfloat16").
    The conditioning is FluxWorks' text encoding of the caption."""
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    if not caches:
        raise ValueError("no configurations to sample: pass [None] for plain core")
    if inference_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"inference_dtype must be 'float32' or 'bfloat16', got {inference_dtype!r}")
    model_file = model_file or os.path.join(EMBEDDED_DIR, FILES["transformer"])
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"transformer file {model_file} not found")
    cond = pipeline.encode(captions, t5_length)
    spec = {"model": os.path.abspath(model_file), "device": device, "inference_dtype": inference_dtype,
            "steps": steps, "guidance": guidance,
            "size": IMAGE_SIZE, "max_shift": MAX_SHIFT, "base_shift": BASE_SHIFT, "seeds": list(seeds),
            "jobs": [{"cache": None} if c is None else asdict(c) | {"cache": c.kind} for c in caches]}
    with tempfile.TemporaryDirectory(prefix="core_cache_") as tmp:
        spec_path, inputs_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "inputs.safetensors")
        outputs_path, log_path = os.path.join(tmp, "outputs.safetensors"), os.path.join(tmp, "core.log")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        save_file({"context": cond.embeds.float().cpu().contiguous(),
                   "pooled": cond.pooled.float().cpu().contiguous()}, inputs_path)
        env = {**os.environ, "PYTHONPATH": comfyui_path()}
        with open(log_path, "w", encoding="utf-8") as log:
            result = subprocess.run([PYTHON, CHILD, spec_path, inputs_path, outputs_path], cwd=comfyui_path(),
                                    env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        if result.returncode != 0:
            with open(log_path, encoding="utf-8") as log:
                raise RuntimeError(f"core sampling child failed (exit {result.returncode}):\n{log.read()[-6000:]}")
        latents = load_file(outputs_path)
        with open(outputs_path + ".json", encoding="utf-8") as f:
            calls = json.load(f)["transformer_calls"]
    return [CoreRun(c, latents[f"job{j}"], tuple(calls[j]), steps) for j, c in enumerate(caches)]


def _errors(latents: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    errors = relative_errors(latents, reference)
    return {"latent_rel_error_mean": round(float(errors.mean()), 6), "latent_rel_error_max": round(float(errors.max()), 6)}


def core_cache_report(pipeline: EmbeddedPipeline, captions: list[str], steps: int, caches: list[CoreCache],
                      guidance: float = RECOMMENDED_GUIDANCE, device: str = "cpu") -> dict:
    """Plain core against the FluxWorks sampler (the parity of the path), then every cache configuration against
    plain core: steps skipped, final-latent relative error (per image, mean and max) and adherence."""
    seeds = noise_seeds(len(captions))
    start = time.monotonic()
    runs = sample_core(pipeline, captions, seeds, steps, [None, *caches], guidance, device=device)
    core_seconds = time.monotonic() - start
    ours = pipeline.sample(captions, seeds, steps, GuidanceCurve.constant(guidance))
    plain = runs[0]
    if set(plain.transformer_calls) != {steps}:
        raise RuntimeError(f"plain core ran the transformer {plain.transformer_calls} times, expected {steps} each")
    _, ours_summary = score_latents(pipeline, ours.latents, captions)
    _, plain_summary = score_latents(pipeline, plain.latents, captions)
    report = {
        "evaluator": EVALUATOR, "captions": captions, "seeds": seeds, "steps": steps, "guidance": guidance,
        "t5_length": RECOMMENDED_T5_LENGTH, "size": IMAGE_SIZE, "device": device, "core_seconds": round(core_seconds, 1),
        "sampler": "core KSampler euler / simple, cfg 1, FluxGuidance, ModelSamplingFlux(1.15, 0.5, 128, 128)",
        "fluxworks": {"adherence": ours_summary},
        "core_plain": {"adherence": plain_summary, "vs_fluxworks": _errors(plain.latents, ours.latents)},
        "caches": [],
    }
    logger.info("plain core vs FluxWorks: %s", report["core_plain"]["vs_fluxworks"])
    for run in runs[1:]:
        _, summary = score_latents(pipeline, run.latents, captions)
        row = {"cache": asdict(run.cache), "label": run.cache.label(), "skipped_steps": list(run.skipped),
               "skipped_mean": round(float(np.mean(run.skipped)), 3), "skipped_share": round(run.skipped_share, 4),
               "vs_core_plain": _errors(run.latents, plain.latents), "adherence": summary}
        logger.info("%-36s skipped %.2f of %d, latent error %s, adherence %.3f", row["label"], row["skipped_mean"],
                    steps, row["vs_core_plain"], summary["adherence"])
        report["caches"].append(row)
    return report


def main() -> None:
    parser = sweep_parser(__doc__.splitlines()[0], SWEEP_STEPS)
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in SWEEP_THRESHOLDS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    caches = [CoreCache(kind, t) for kind in CACHE_KINDS for t in thresholds]
    # EasyCache as fp32 core runs it, without the input copy: shows what the in-place update does.
    caches.append(CoreCache("EasyCache", 0.2, copy_input=False))
    pipeline = start(args, args.device)
    report = core_cache_report(pipeline, split_captions(args.split, args.captions), args.steps, caches,
                               args.guidance, args.device)
    report["split"] = args.split
    write_report(args.json, report)


if __name__ == "__main__":
    main()
