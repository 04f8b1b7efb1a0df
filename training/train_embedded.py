"""Build the embedded FLUX.1-architecture model from nothing: render the shapes dataset, train the taef1-layout
autoencoder, train tiny T5 + CLIP-L with the transformer (rectified flow), distill guidance, and export
the four files in the formats FLUX.1 ships in. Seeded; the same command gives the same dataset and, up to
GPU arithmetic order, the same weights, as long as no stage is cut short by --time-limit.

Usage: the shipped files come from two commands of under ten minutes each (13.8 minutes of training in all
on one H200; training/build_embedded.sh runs both; embedded_model/README.md says what each did):
    python -m training.train_embedded --out embedded_model --time-limit 540 --distill-steps 0 --flow-steps 30000
    python -m training.train_embedded --init-from embedded_model --seed 1 --images 100000 --flow-batch 512 ...
CPU check of the whole pipeline at toy sizes (a few minutes):
    python -m training.train_embedded --smoke --out /tmp/embedded_smoke
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from multiprocessing import Pool

import numpy as np
import torch

from evaluation.embedded import FILES
from fluxworks.flux_models.text_encoders import Tokenizers

from .autoencoder import encode_images, export_autoencoder, train_autoencoder
from .diffusion import EMA, FlowData, Schedule, distill_guidance, train_flow
from .flux_model import build_flux, export_flux
from .resume import load_autoencoder_weights, load_flux_weights, load_text_weights
from .shapes import render_batch
from .text_encoders import CaptionTokens, build_text_encoders, export_text_encoders, tokenize_with

logger = logging.getLogger(__name__)

CHUNK = 1000  # images per dataset chunk (each chunk has its own seeded generator)


def make_dataset(count: int, seed: int, workers: int,
                 tokenizer_folders: tuple[str, str]) -> tuple[np.ndarray, list[str], CaptionTokens]:
    """`count` training-split images (N, 128, 128, 3) uint8, their captions and token ids, made in parallel
    chunks (each chunk seeded on its own, so the result does not depend on `workers`)."""
    jobs = [(seed, i, min(CHUNK, count - i * CHUNK)) for i in range((count + CHUNK - 1) // CHUNK)]
    with Pool(max(1, workers)) as pool:
        parts = pool.starmap(render_batch, jobs)
        captions = [c for p in parts for c in p[1]]
        share = (len(captions) + workers - 1) // max(1, workers)
        pieces = pool.starmap(tokenize_with, [(tokenizer_folders, captions[i:i + share])
                                              for i in range(0, len(captions), share)])
    pad = int(Tokenizers.from_folders(*tokenizer_folders).t5.pad_token_id)
    tokens = CaptionTokens.from_arrays(np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]),
                                       pad)
    return np.concatenate([p[0] for p in parts]), captions, tokens


def preflight(device: torch.device, tokenizers: Tokenizers, batch: int, seed: int) -> None:
    """A few full-size flow and distillation steps at both T5 lengths on random latents, before the long
    stages: a kernel that fails on this machine then costs seconds, not the dataset and the autoencoder."""
    _, captions = render_batch(seed + 99, 0, 16)
    tokens, empty = CaptionTokens.from_captions(tokenizers, captions), CaptionTokens.from_captions(tokenizers, [""])
    latents = torch.randn(len(captions), 16, 16, 16, device=device).half()
    data = FlowData.build(latents, tokens, empty)
    flux = build_flux(seed).to(device)
    t5, clip = (m.to(device) for m in build_text_encoders(seed))
    for long_share in (0.0, 1.0):
        plan = Schedule(3, batch, 1e-4, deadline=float("inf"), long_t5=long_share)
        ema = train_flow(flux, t5, clip, data, plan, seed)
        teacher, t5_avg, clip_avg = ema.copies()
        distill_guidance(teacher, t5_avg, clip_avg, data, Schedule(2, batch, 1e-4, float("inf"), long_t5=long_share), seed)
    logger.info("preflight passed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="embedded_model", help="folder for the four model files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=200_000, help="training images rendered")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--vae-lr", type=float, default=5e-4)
    parser.add_argument("--flow-steps", type=int, default=4000)
    parser.add_argument("--flow-batch", type=int, default=256)
    parser.add_argument("--flow-lr", type=float, default=5e-4)
    parser.add_argument("--distill-steps", type=int, default=1000, help="0: stop after the flow stage")
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds; the stages end by 26%%/74%%/90%% of it even if steps remain (flow by 90%% "
                             "when --distill-steps is 0)")
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--benchmark", default=None, help="after training, write the adherence report here")
    parser.add_argument("--grid", default=None, help="with --benchmark: picture grid PNG")
    parser.add_argument("--log", default=None, help="also write the log to this file")
    parser.add_argument("--init-from", default=None,
                        help="folder of exported files to continue from (its autoencoder is kept as it is)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and steps: checks the pipeline on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.vae_steps, args.vae_batch = 64, 3, 2
        args.flow_steps, args.flow_batch, args.distill_steps = 3, 4, min(args.distill_steps, 2)
        args.time_limit = max(args.time_limit, 3600.0)  # step-limited, however slow the CPU
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log:
        os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
        handlers.append(logging.FileHandler(args.log, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.monotonic()
    logger.info("settings: %s", vars(args))

    folders = (args.clip_tokenizer, args.t5_tokenizer)
    tokenizers = Tokenizers.from_folders(*folders)
    preflight(device, tokenizers, args.flow_batch, args.seed)
    images_np, captions, tokens = make_dataset(args.images, args.seed, args.workers, folders)
    empty = CaptionTokens.from_captions(tokenizers, [""])
    logger.info("dataset: %d images, %d distinct captions (%.1f s)", len(captions), len(set(captions)),
                time.monotonic() - start)
    images = torch.from_numpy(images_np).to(device)

    paths = {role: os.path.join(args.out, name) for role, name in FILES.items()}
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.init_from:
        vae = load_autoencoder_weights(os.path.join(args.init_from, FILES["vae"]), device)
    else:
        vae = train_autoencoder(images, args.vae_steps, args.vae_batch, args.vae_lr, args.seed, device,
                                deadline=start + 0.26 * args.time_limit)
    export_autoencoder(vae, paths["vae"])
    latents = encode_images(vae, images)
    del images
    logger.info("latents: %s mean %.3f std %.3f (%.1f s)", tuple(latents.shape), latents.float().mean().item(),
                latents.float().std().item(), time.monotonic() - start)
    data = FlowData.build(latents, tokens, empty)

    flux = build_flux(args.seed)
    t5, clip = build_text_encoders(args.seed)
    if args.init_from:
        load_flux_weights(flux, os.path.join(args.init_from, FILES["transformer"]))
        load_text_weights(t5, clip, *(os.path.join(args.init_from, FILES[r]) for r in ("t5", "clip_l")))
        logger.info("continuing from %s", args.init_from)
    flux, t5, clip = flux.to(device), t5.to(device), clip.to(device)

    def save_stage1(ema: EMA) -> None:
        flux_avg, t5_avg, clip_avg = ema.copies()
        export_flux(flux_avg, paths["transformer"], preview_vae=os.path.basename(paths["vae"]))
        export_text_encoders(t5_avg, clip_avg, args.out, FILES["t5"], FILES["clip_l"])

    distill = args.distill_steps > 0
    flow_plan = Schedule(args.flow_steps, args.flow_batch, args.flow_lr,
                         deadline=start + (0.74 if distill else 0.90) * args.time_limit)
    ema = train_flow(flux, t5, clip, data, flow_plan, args.seed + 1, checkpoint=save_stage1)
    save_stage1(ema)
    teacher, t5_avg, clip_avg = ema.copies()
    del flux, t5, clip, ema
    if not distill:
        logger.info("no guidance distillation (--distill-steps 0): the exported transformer is the flow model")

    def save_stage2(student_ema: EMA) -> None:
        export_flux(student_ema.copies()[0], paths["transformer"], preview_vae=os.path.basename(paths["vae"]))

    if distill:
        distill_plan = Schedule(args.distill_steps, args.flow_batch, args.distill_lr,
                                deadline=start + 0.90 * args.time_limit)
        save_stage2(distill_guidance(teacher, t5_avg, clip_avg, data, distill_plan, args.seed + 2,
                                     checkpoint=save_stage2))
    sizes = {name: os.path.getsize(p) for name, p in paths.items()}
    logger.info("exported %s: %s bytes, %.1f MB in all (%.1f s)", args.out, sizes, sum(sizes.values()) / 1e6,
                time.monotonic() - start)

    if args.benchmark:
        from evaluation.benchmark import benchmark

        torch.backends.cuda.matmul.allow_tf32 = False  # the report is measured in true fp32, as on a CPU
        torch.backends.cudnn.allow_tf32 = False
        report = benchmark(args.out, (args.clip_tokenizer, args.t5_tokenizer), 4 if args.smoke else 50,
                           args.device, args.benchmark, args.grid, quick=args.smoke)
        logger.info("benchmark reference %s (%.1f s)", report["reference"], time.monotonic() - start)


if __name__ == "__main__":
    main()
