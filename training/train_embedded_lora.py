"""Train the example LoRA for the embedded model: it teaches the shape word "diamond" (a square standing on a
corner), which the embedded model never saw.

A rank-16 PEFT LoRA on every attention and feed-forward projection of the embedded transformer (the text
encoders stay as shipped), trained with the rectified-flow loss on scenes that hold a diamond, captioned in the
model's grammar ("a large yellow diamond in the center, on a purple background"). Half of every batch keeps
the model as it was (prior preservation, as in DreamBooth): ordinary training-split captions whose target is the
frozen base model's own output at the same input, so the distilled guidance keeps working for everything else.
The file is saved with diffusers' `FluxPipeline.save_lora_weights`, the diffusers/PEFT format that FluxWorks
LoRA Stack reads (`transformer.<module>.lora_A/lora_B.weight` + `lora_adapter_metadata`).

Usage: the shipped file came from the defaults on one H200 (1,627 of 3,000 steps in the 110 s time limit, data
69 s; the log is embedded_model/training_log_lora.txt):
    python -m training.train_embedded_lora --device cuda
The script runs on a CPU as well (--device cpu); a step takes seconds there, so raise --time-limit.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.embedded import RECOMMENDED_GUIDANCE
from fluxworks.flux_sampler.latents import unpack

from .diffusion import EMA, Schedule, _train_loop
from .embedded_base import encode_captions, image_latents, load_base, noised, size_of, transformer_inputs
from .shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ExtraShape,
    Scene,
    ShapeObject,
    render_batch,
)
from .shapes import render as render_shapes

logger = logging.getLogger(__name__)

OUT = os.path.join("embedded_model", "loras", "flux1-shapes-tiny-lora-diamond.safetensors")
NEW_SHAPE = "diamond"
DIAMOND_OUTER = 1.25  # corner distance from the centre, in nominal radii (a square's half side is 0.9)
RANK = 16
TARGET_MODULES = [  # every projection inside the blocks; the embedders and the output layer stay as they are
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    "single_transformer_blocks.0.proj_out",
]


def diamond_polygon(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of the diamond: corners up, right, down, left."""
    d = DIAMOND_OUTER * r
    return [(cx, cy - d), (cx + d, cy), (cx, cy + d), (cx - d, cy)]


DIAMOND = {NEW_SHAPE: ExtraShape(DIAMOND_OUTER, diamond_polygon)}


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """`training.shapes.render` with diamonds allowed."""
    return render_shapes(scene, rng, DIAMOND)


def diamond_scene(rng: np.random.Generator) -> Scene:
    """One diamond (60 %) or a diamond and another shape, distinct colours and cells, on another colour."""
    count = 1 if rng.random() < 0.6 else 2
    colours = list(COLOURS)
    picked = rng.choice(len(colours), size=count + 1, replace=False)
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = tuple(
        ShapeObject(NEW_SHAPE if i == 0 else SHAPES[int(rng.integers(len(SHAPES)))], colours[int(picked[i + 1])],
                    list(SIZES)[int(rng.integers(len(SIZES)))], list(POSITIONS)[int(cells[i])])
        for i in range(count))
    order = rng.permutation(count)  # the diamond is not always named first
    return Scene(tuple(objects[int(i)] for i in order), colours[int(picked[0])])


def diamond_samples(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, 11])
    scenes = [diamond_scene(rng) for _ in range(count)]
    return np.stack([render(s, rng) for s in scenes]), [s.caption() for s in scenes]


def save_lora(transformer, path: str) -> str:
    """diffusers' LoRA file of the transformer's PEFT adapter, fp16, as `FluxPipeline.save_lora_weights` writes."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    config = transformer.peft_config["default"].to_dict()
    metadata = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "use_rslora", "alpha_pattern",
                                       "rank_pattern") if k in config}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    with tempfile.TemporaryDirectory() as folder:
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name="lora.safetensors",
                                       transformer_lora_adapter_metadata=metadata)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.copyfile(os.path.join(folder, "lora.safetensors"), path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=6000, help="diamond pictures (and as many ordinary ones)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64, help="half diamond scenes, half prior preservation")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--time-limit", type=float, default=110.0, help="seconds for the training steps")
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from peft import LoraConfig

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logger.info("settings: %s", vars(args))
    torch.manual_seed(args.seed)
    start = time.monotonic()
    base = load_base((args.clip_tokenizer, args.t5_tokenizer), args.device)
    new_images, new_captions = diamond_samples(args.images, args.seed)
    old_images, old_captions = render_batch(args.seed + 5, 0, args.images)
    latents = {"new": image_latents(base, new_images), "old": image_latents(base, old_images)}
    text = {"new": encode_captions(base, new_captions), "old": encode_captions(base, old_captions)}
    logger.info("data: %d diamond and %d ordinary pictures, prepared in %.1f s", len(new_captions),
                len(old_captions), time.monotonic() - start)

    transformer = base.transformer
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                       target_modules=TARGET_MODULES))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator(base.device).manual_seed(args.seed + 1)
    half = args.batch // 2

    def batch(part: str):
        which = torch.randint(0, len(latents[part]), (half,), device=base.device, generator=generator)
        return latents[part][which], *text[part].rows(which)

    def loss_at() -> torch.Tensor:
        x0, txt, pooled = batch("new")
        xt, sigma, target = noised(x0, generator)
        out = transformer(**transformer_inputs(xt, sigma, txt, pooled, RECOMMENDED_GUIDANCE), return_dict=False)[0]
        new = F.mse_loss(unpack(out, *x0.shape[2:]), target)
        x0, txt, pooled = batch("old")
        xt, sigma, _ = noised(x0, generator)
        inputs = transformer_inputs(xt, sigma, txt, pooled, RECOMMENDED_GUIDANCE)
        with torch.no_grad():
            transformer.disable_adapters()
            frozen = transformer(**inputs, return_dict=False)[0]
            transformer.enable_adapters()
        old = F.mse_loss(transformer(**inputs, return_dict=False)[0], frozen)
        return new + old

    plan = Schedule(args.steps, args.batch, args.lr, deadline=time.monotonic() + args.time_limit, log_every=100,
                    checkpoint_every=math.inf)
    ema = _train_loop("lora", params, EMA([torch.nn.ParameterList(params)], decay=0.995), plan, 100, loss_at, None)
    with torch.no_grad():  # the averaged LoRA weights go into the adapter that is saved
        for p, averaged in zip(params, ema.shadow, strict=True):
            p.copy_(averaged)
    with torch.no_grad():  # diamond pictures, the same noisy inputs without and with the LoRA
        losses = []
        for enabled in (False, True):
            if enabled:
                transformer.enable_adapters()
            else:
                transformer.disable_adapters()
            g = torch.Generator(base.device).manual_seed(args.seed + 2)
            total = 0.0
            for w in torch.arange(min(len(new_captions), 2048), device=base.device).split(256):
                x0 = latents["new"][w]
                xt, sigma, target = noised(x0, g)
                out = transformer(**transformer_inputs(xt, sigma, *text["new"].rows(w), RECOMMENDED_GUIDANCE),
                                  return_dict=False)[0]
                total += F.mse_loss(unpack(out, *x0.shape[2:]), target).item() * len(w)
            losses.append(total / min(len(new_captions), 2048))
        transformer.enable_adapters()
    logger.info("flow loss on diamond pictures: %.4f without the LoRA, %.4f with it", *losses)
    save_lora(transformer, args.out)
    logger.info("wrote %s (%s, %d parameters) after %.1f s", args.out, size_of(args.out), sum(p.numel() for p in params),
                time.monotonic() - start)


if __name__ == "__main__":
    main()
