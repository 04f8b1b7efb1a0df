"""Train the example ControlNet for the embedded model: Canny edges of a shapes picture decide where the shapes go.

The ControlNet is a diffusers `FluxControlNetModel` of the embedded transformer's width (2 heads x 128, one
double-stream block), initialised from the transformer's own embedders and first block
(`FluxControlNetModel.from_transformer`, zero-initialised control input and output projections, as
InstantX-style ControlNets start), and trained with the rectified-flow loss while the embedded model stays
frozen. Its control input is what the example workflow feeds it: FluxWorks Canny Edges (thresholds 0.1 / 0.2,
blur 1) of a picture, VAE-encoded with the embedded VAE by FluxWorks Apply ControlNet.

To make the control image, not the caption, decide the layout, single-shape captions name another grid
position than the one the edges show in `--moved` of the samples (the target picture follows the edges);
scenes of two or three shapes keep their true captions. Captions come from the training split of
`training.shapes` only, so the held-out captions stay unseen for the measurement
(`devtools/measure_embedded_adapters.py`).

Usage: the shipped file came from the defaults on one H200 (4,000 steps in 97 s, data 48 s; the log is
embedded_model/training_log_controlnet.txt):
    python -m training.train_embedded_controlnet --device cuda
The script runs on a CPU as well (--device cpu); a step of batch 64 takes seconds there, so raise --time-limit.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import numpy as np
import torch

from devtools.tiny_controlnets import write_controlnet
from fluxworks.flux_controlnet import canny_edges
from fluxworks.flux_sampler.latents import pack

from .diffusion import EMA, Schedule, _train_loop
from .embedded_base import encode_captions, flow_loss, image_latents, load_base, size_of
from .shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject, is_held_out, random_scene, render

logger = logging.getLogger(__name__)

OUT = os.path.join("embedded_model", "controlnet", "flux1-shapes-tiny-controlnet-canny.safetensors")
# FluxWorks Canny Edges defaults, which the example workflow keeps.
CANNY = dict(low_threshold=0.1, high_threshold=0.2, blur_sigma=1.0)
SINGLE_SHAPE = 0.7  # share of samples with one shape (the rest: 2-3 shapes, true captions)


def single_shape_scene(rng: np.random.Generator) -> Scene:
    colours = list(COLOURS)
    background, colour = (colours[int(i)] for i in rng.choice(len(colours), size=2, replace=False))
    obj = ShapeObject(SHAPES[int(rng.integers(len(SHAPES)))], colour, list(SIZES)[int(rng.integers(len(SIZES)))],
                      list(POSITIONS)[int(rng.integers(len(POSITIONS)))])
    return Scene((obj,), background)


def moved(scene: Scene, rng: np.random.Generator) -> Scene:
    """The single-shape `scene` with its shape named at another grid position."""
    [obj] = scene.objects
    others = [p for p in POSITIONS if p != obj.position]
    position = others[int(rng.integers(len(others)))]
    return Scene((ShapeObject(obj.shape, obj.colour, obj.size, position),), scene.background)


def make_samples(count: int, seed: int, moved_share: float) -> tuple[np.ndarray, list[str]]:
    """`count` pictures (N, 128, 128, 3) uint8 and the captions to train them with, all from the training split."""
    rng = np.random.default_rng([seed, 7])
    images, captions = [], []
    while len(captions) < count:
        if rng.random() < SINGLE_SHAPE:
            scene = single_shape_scene(rng)
            said = moved(scene, rng) if rng.random() < moved_share else scene
        else:
            scene = said = random_scene(rng)
        if is_held_out(said.caption()) or is_held_out(scene.caption()):
            continue
        images.append(render(scene, rng))
        captions.append(said.caption())
    return np.stack(images), captions


@torch.no_grad()
def edge_pictures(images: np.ndarray, device: torch.device | str = "cpu", batch: int = 1024) -> np.ndarray:
    """What FluxWorks Canny Edges makes of each picture: white edges on black, (N, H, W, 3) uint8."""
    out = []
    for i in range(0, len(images), batch):
        edges = canny_edges(torch.from_numpy(images[i:i + batch]).to(device).float() / 255.0, **CANNY)
        out.append((edges[..., None].expand(*edges.shape, 3) * 255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def build_controlnet(transformer: torch.nn.Module) -> torch.nn.Module:
    """One double-stream block at the transformer's width, started from the transformer's weights."""
    from diffusers import FluxControlNetModel

    config = transformer.config
    return FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=0, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads, load_weights_from_transformer=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=10_000, help="distinct training pictures")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--moved", type=float, default=0.5,
                        help="share of single-shape captions that name another position than the edges show")
    parser.add_argument("--time-limit", type=float, default=170.0, help="seconds for the training steps")
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logger.info("settings: %s", vars(args))
    torch.manual_seed(args.seed)
    start = time.monotonic()
    base = load_base((args.clip_tokenizer, args.t5_tokenizer), args.device)
    images, captions = make_samples(args.images, args.seed, args.moved)
    latents = image_latents(base, images)
    controls = pack(image_latents(base, edge_pictures(images, base.device)))
    text = encode_captions(base, captions)
    logger.info("data: %d pictures, %d distinct captions, prepared in %.1f s", len(captions), len(text.pooled),
                time.monotonic() - start)

    controlnet = build_controlnet(base.transformer).to(base.device).train().requires_grad_(True)
    generator = torch.Generator(base.device).manual_seed(args.seed + 1)

    def loss_at() -> torch.Tensor:
        which = torch.randint(0, len(captions), (args.batch,), device=base.device, generator=generator)
        txt, pooled = text.rows(which)
        return flow_loss(base.transformer, latents[which], txt, pooled, generator, controlnet, controls[which])

    plan = Schedule(args.steps, args.batch, args.lr, deadline=time.monotonic() + args.time_limit, log_every=50,
                    checkpoint_every=float("inf"))
    ema = _train_loop("controlnet", list(controlnet.parameters()), EMA([controlnet], decay=0.99), plan, 50, loss_at,
                      None)
    [trained] = ema.copies()
    with torch.no_grad():  # the same noisy inputs with and without the ControlNet
        losses = [(flow_loss(base.transformer, latents[w], *text.rows(w), torch.Generator(base.device).manual_seed(i)),
                   flow_loss(base.transformer, latents[w], *text.rows(w), torch.Generator(base.device).manual_seed(i),
                             trained, controls[w]))
                  for i, w in enumerate(torch.arange(len(captions), device=base.device).split(256)[:8])]
    logger.info("flow loss on %d training pictures: %.4f without the ControlNet, %.4f with it",
                min(len(captions), 8 * 256), *np.mean([[a.item(), b.item()] for a, b in losses], axis=0))
    write_controlnet(args.out, copy.deepcopy(trained).half(), "diffusers")
    logger.info("wrote %s (%s, %d parameters) after %.1f s", args.out, size_of(args.out),
                sum(p.numel() for p in trained.parameters()), time.monotonic() - start)


if __name__ == "__main__":
    main()
