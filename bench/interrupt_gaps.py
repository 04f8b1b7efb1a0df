"""How long the FluxWorks Sampler can go without checking for ComfyUI's Cancel, on the CPU with the embedded model.

For each shape, one sampling step (one transformer call, the node's path: `sample_prepared` with an interrupt
check) is run twice: with one check per block (`InterruptCheck(work=None)`, what the sampler did before
flux_speed/interrupt.py) and with the CPU default (`work_per_check`). Every check records the time; the longest
gap between two checks (or between the call's start/end and the nearest check) bounds how late a Cancel is
honoured. Also written: the largest batch (128x128) and square size (batch 1) the sampler's memory check
accepts with `--free-gib` free, and the per-block times extrapolated to them (batch: linear; size: the
attention part quadratic in tokens, the rest linear, fitted to the measured shapes).

Usage: OMP_NUM_THREADS=2 python -m bench.interrupt_gaps --json docs/bench/interrupt_gaps_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch

from evaluation.embedded import EMBEDDED_DIR, FILES, RECOMMENDED_T5_LENGTH
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_sampler.memory import estimate_sampling_memory
from fluxworks.flux_sampler.sampling import TextConditioning
from fluxworks.flux_sampler.schedule import get_sigmas
from fluxworks.flux_speed.interrupt import InterruptCheck, work_per_check
from fluxworks.flux_speed.prepare import SpeedOptions, sample_prepared

CPU = torch.device("cpu")
SHAPES = ((256, 128), (1, 2048))  # (batch, pixels): batch-heavy and sequence-heavy, ~10 s per block on 2 cores


def one_step(transformer, batch: int, pixels: int, work: int | None) -> dict:
    stamps: list[float] = []
    check = InterruptCheck(lambda: stamps.append(time.perf_counter()), work)
    latent = pixels // 8
    shape = (batch, 16, latent, latent)
    torch.manual_seed(0)
    cond = TextConditioning(torch.randn(1, RECOMMENDED_T5_LENGTH, 64), torch.randn(1, 64))
    start = time.perf_counter()
    sample_prepared(transformer, SpeedOptions(), CPU, torch.float32, interrupt=check, guidance_embeds=True,
                    positive=cond, negative=None, latent=torch.zeros(shape), noise=make_noise(shape, 0),
                    sigmas=get_sigmas(1, 1.15), curve=GuidanceCurve.constant(2.0))
    end = time.perf_counter()
    points = [start, *stamps, end]
    gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
    return {"checks": len(stamps), "step_s": round(end - start, 3), "max_gap_s": round(max(gaps), 3),
            "gaps_s": [round(g, 3) for g in gaps] if len(gaps) <= 12 else None}


def largest_accepted(free: int, width: int) -> dict:
    """The largest batch of 128x128 and the largest square size at batch 1 the memory check lets through."""
    def fits(batch: int, latent: int) -> bool:
        return estimate_sampling_memory(batch, latent, latent, RECOMMENDED_T5_LENGTH, width, 4).total <= free
    batch = 1
    while fits(batch * 2, 16):
        batch *= 2
    step = batch
    while step > 1:
        step //= 2
        if fits(batch + step, 16):
            batch += step
    latent = 2
    while fits(1, latent + 2):
        latent += 2
    return {"batch_at_128px": batch, "tokens_at_batch": batch * (64 + RECOMMENDED_T5_LENGTH),
            "square_px_at_batch_1": latent * 8, "tokens_at_square": (latent // 2) ** 2 + RECOMMENDED_T5_LENGTH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--free-gib", type=float, default=20.0, help="free memory the memory check sees "
                        "(a 24 GiB machine: about 20)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = os.path.join(EMBEDDED_DIR, FILES["transformer"])
    transformer, config, _ = load_flux_transformer(path, "default", torch.float32)
    width = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    rows = []
    with torch.no_grad():
        for batch, pixels in SHAPES:
            row = {"batch": batch, "pixels": pixels,
                   "tokens": batch * ((pixels // 16) ** 2 + RECOMMENDED_T5_LENGTH),
                   "per_block": one_step(transformer, batch, pixels, None),
                   "pieces": one_step(transformer, batch, pixels, work_per_check(CPU))}
            rows.append(row)
            logging.info("%s", json.dumps(row))
    limits = largest_accepted(int(args.free_gib * 1024**3), width)
    batch_row, image_row = rows
    per_block_batch = batch_row["per_block"]["step_s"] / blocks
    limits["block_s_at_batch_extrapolated"] = round(per_block_batch * limits["batch_at_128px"] / batch_row["batch"])
    # Sequence-heavy: attention ~ tokens^2 x width; the rest ~ tokens. Split the measured block time by the work
    # model of flux_speed.interrupt (token work vs attention work) and scale each part.
    from fluxworks.flux_speed.interrupt import token_work
    n = image_row["tokens"]
    linear, attention = n * token_work(width), 2 * n * n * width
    block = image_row["per_block"]["step_s"] / blocks
    big = limits["tokens_at_square"]
    scaled = block * (linear * big / n + attention * (big / n) ** 2) / (linear + attention)
    limits["block_s_at_square_extrapolated"] = round(scaled)
    report = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_average": os.getloadavg(), "platform": platform.platform()},
              "model": "embedded flux1-shapes-tiny (width 256, 2 double + 1 single blocks), float32, T5 length 128",
              "work_per_check": work_per_check(CPU), "shapes": rows, "free_gib": args.free_gib,
              "accepted_by_memory_check": limits,
              "note": "the machine is shared (see load_average): times are upper bounds for an idle 2-core CPU"}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    logging.info("%s", json.dumps(limits))


if __name__ == "__main__":
    main()
