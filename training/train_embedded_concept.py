"""Teach the embedded model a shape it never saw, a heart, named by the rare token "ciel", from 30 pictures, with the
pack's LoRA trainer (flux_training) on the CPU, and measure it before and after.

Why "ciel" and not DreamBooth's "sks": T5's tokenizer splits "sks" into four pieces ("▁", "s", "k", "s"), none of
which the embedded T5 ever saw, and they disturb the encoding of the words around them (cosine similarity of the
"large" token's output to its output in the same caption with "circle": 0.57; "ciel" is one piece: >= 0.93 for every
other token). With "sks" the trained model lost the colour of the token's object on held-out prompts (e.g. a black
shape for "a large purple sks ..."), and the concept score was 0-10 %; with "ciel" colours stay right.

Data: 30 rendered scenes with one heart (alone, or beside one ordinary shape), captioned in the model's grammar with
the token as the shape word ("a large red ciel in the center, on a blue background"), encoded once as the FluxWorks
LoRA Dataset node encodes them (text as FluxWorks Text Encode at 128 T5 tokens, pictures through the embedded VAE's
encoder). Prior preservation as DreamBooth and diffusers' script do it (--with_prior_preservation): the base model's
own samples of ordinary training-split captions, so the rest of the model stays as it was.

Measured (before and after, same captions and seeds, the recommended sampler settings): the share of held-out token
prompts where the token's object is drawn as a heart (`evaluation.adherence.concept_found`), and adherence on the
test split of the original held-out captions (`evaluation.splits.test_captions`). The trained file goes through the
pack's LoRA stack code (flux_lora) onto a copy of the transformer for the "after" pictures.

Usage: OMP_NUM_THREADS=1 python -m training.train_embedded_concept --json docs/bench/embedded_concept_lora.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch
from PIL import Image

from evaluation.adherence import EVALUATOR, analyse, concept_found, score_image, summarise
from evaluation.embedded import RECOMMENDED_STEPS, EmbeddedPipeline, load_autoencoder
from evaluation.splits import noise_seeds, test_captions
from fluxworks.flux_lora import RouteTable, add_deltas, convert_lora, linear_shapes, read_lora_file
from fluxworks.flux_sampler.latents import to_model_space
from fluxworks.flux_training import CachedDataset, LoraTrainer, TrainSettings

from .embedded_base import encode_captions, image_latents, load_base
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

TOKEN = "ciel"  # one T5 piece (see above)
CONCEPT = "heart"
HEART_OUTER = 1.2  # half width of the heart, in nominal radii (a circle's radius is 1.0)
SETTINGS = TrainSettings(steps=400, rank=8, alpha=8.0, learning_rate=1e-3, lr_schedule="cosine", lr_warmup_steps=20,
                         batch_size=8, timestep_sampling="flux_shift", guidance=2.0, lora_layers="attention_mlp",
                         seed=0)


def heart_polygon(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """96 vertices of the classic heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), scaled to
    a half width of HEART_OUTER * r and centred on its bounding box."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    scale = HEART_OUTER * r / 16
    middle = (y.max() + y.min()) / 2
    return [(cx + float(a) * scale, cy + float(b - middle) * scale) for a, b in zip(x, y, strict=True)]


HEART = {CONCEPT: ExtraShape(HEART_OUTER, heart_polygon)}


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """`training.shapes.render` with hearts allowed (the shape name CONCEPT)."""
    return render_shapes(scene, rng, HEART)


def heart_scene(rng: np.random.Generator) -> Scene:
    """One heart (60 %) or a heart and one ordinary shape; distinct colours and cells."""
    count = 1 if rng.random() < 0.6 else 2
    colours = list(COLOURS)
    picked = rng.choice(len(colours), size=count + 1, replace=False)
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = [ShapeObject(CONCEPT if i == 0 else SHAPES[int(rng.integers(len(SHAPES)))], colours[int(picked[i + 1])],
                           list(SIZES)[int(rng.integers(len(SIZES)))], list(POSITIONS)[int(cells[i])])
               for i in range(count)]
    order = rng.permutation(count)
    return Scene(tuple(objects[int(i)] for i in order), colours[int(picked[0])])


def hearts_scene(rng: np.random.Generator, most: int) -> Scene:
    """1 to `most` hearts (at most 3 objects in all, as the base model's captions), else like `heart_scene`: an
    ordinary shape beside them 40 % of the time while there is room; distinct colours and cells. Several hearts in
    one picture show the token with more colours, sizes and cells per picture."""
    hearts = int(rng.integers(1, most + 1))
    count = hearts + (1 if hearts < 3 and rng.random() < 0.4 else 0)
    colours = list(COLOURS)
    picked = rng.choice(len(colours), size=count + 1, replace=False)
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = [ShapeObject(CONCEPT if i < hearts else SHAPES[int(rng.integers(len(SHAPES)))],
                           colours[int(picked[i + 1])], list(SIZES)[int(rng.integers(len(SIZES)))],
                           list(POSITIONS)[int(cells[i])])
               for i in range(count)]
    order = rng.permutation(count)
    return Scene(tuple(objects[int(i)] for i in order), colours[int(picked[0])])


def token_caption(scene: Scene, token: str = TOKEN) -> str:
    """The scene's caption with the token as the heart's shape word."""
    return scene.caption().replace(f" {CONCEPT} ", f" {token} ")


def concept_data(count: int, seed: int, token: str = TOKEN, hearts: int = 1) -> tuple[np.ndarray, list[str]]:
    """`count` training pictures and captions: `heart_scene`s, or with `hearts` > 1, `hearts_scene`s."""
    rng = np.random.default_rng([seed, 13])
    scenes = [heart_scene(rng) if hearts == 1 else hearts_scene(rng, hearts) for _ in range(count)]
    return np.stack([render(s, rng) for s in scenes]), [token_caption(s, token) for s in scenes]


def concept_test_prompts(count: int, seed: int, exclude: set[str], token: str = TOKEN) -> list[str]:
    """Held-out token prompts: single-heart scenes whose captions are not among the training captions."""
    rng = np.random.default_rng([seed, 17])
    prompts: list[str] = []
    while len(prompts) < count:
        scene = heart_scene(rng)
        caption = token_caption(scene, token)
        if len(scene.objects) == 1 and caption not in exclude and caption not in prompts:
            prompts.append(caption)
    return prompts


@torch.no_grad()
def vae_prototypes(per_shape: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Mean (extent, solidity, centroid height) of every shape and the heart after the embedded VAE's round trip."""
    from evaluation.embedded import EMBEDDED_DIR, FILES

    vae = load_autoencoder(os.path.join(EMBEDDED_DIR, FILES["vae"]))
    rng = np.random.default_rng([seed, 19])
    prototypes = {}
    for shape in (*SHAPES, CONCEPT):
        pictures, colours = [], []
        for _ in range(per_shape):
            base = heart_scene(rng).objects[0]
            obj = ShapeObject(shape, base.colour, base.size, base.position)
            others = [c for c in COLOURS if c != obj.colour]
            background = others[int(rng.integers(len(others)))]
            pictures.append(render(Scene((obj,), background), rng))
            colours.append(obj.colour)
        x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        back = ((vae.decode(vae.encode(x)).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        found = [analyse(p)[1].get(c) for p, c in zip(back, colours, strict=True)]
        prototypes[shape] = tuple(float(v) for v in np.mean([f.features for f in found if f is not None], axis=0))
    return prototypes


def prior_data(pipeline: EmbeddedPipeline, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The base model's own samples (model-space latents) of `count` training-split captions: the class images."""
    _, captions = render_batch(seed, 0, count)
    seeds = [seed * 1000 + i for i in range(count)]
    latents = torch.cat([pipeline.sample(captions[i:i + 16], seeds[i:i + 16]).latents
                         for i in range(0, count, 16)])
    return to_model_space(latents), captions


def with_lora(pipeline: EmbeddedPipeline, path: str, strength: float = 1.0) -> EmbeddedPipeline:
    """The pipeline with the LoRA file merged into a copy of its transformer by the pack's LoRA stack code."""
    lora = read_lora_file(path)
    transformer = copy.deepcopy(pipeline.transformer)
    table = RouteTable.build(linear_shapes(transformer, "transformer."))
    converted = convert_lora(lora.tensors, table, lora.metadata, lora.adapter_config, source=os.path.basename(path))
    if converted.unmatched:
        raise ValueError(f"{path}: keys the pack's LoRA stack did not place: {converted.unmatched[:3]}")
    weights = dict(transformer.named_parameters())
    with torch.no_grad():
        for key, adapters in converted.component_patches("transformer").items():
            add_deltas(weights[key.removeprefix("transformer.")].data, adapters, strength)
    return dataclasses.replace(pipeline, transformer=transformer)


def measure(pipeline: EmbeddedPipeline, prompts: list[str], ordinary: list[str], seeds: int,
            prototypes: dict, samples: str | None = None, token: str = TOKEN) -> dict:
    """Concept share on the token prompts and adherence on the ordinary test captions, `seeds` samples per caption;
    with `samples`, the first seed's first 10 pictures of each kind are saved there as a grid (token prompts on top)."""
    found, scores, shown = [], [], []
    for repeat in range(seeds):
        for i in range(0, len(prompts), 25):
            images = pipeline.generate(prompts[i:i + 25], noise_seeds(len(prompts), repeat)[i:i + 25])
            shown += list(images[:10]) if repeat == 0 and i == 0 else []
            found += [concept_found(im, c, token, CONCEPT, prototypes) for im, c in zip(images, prompts[i:i + 25],
                                                                                          strict=True)]
        for i in range(0, len(ordinary), 25):
            images = pipeline.generate(ordinary[i:i + 25], noise_seeds(len(ordinary), repeat)[i:i + 25])
            shown += list(images[:10]) if repeat == 0 and i == 0 else []
            scores += [score_image(im, c) for im, c in zip(images, ordinary[i:i + 25], strict=True)]
    if samples:
        rows = [np.concatenate(shown[j:j + 10], axis=1) for j in range(0, len(shown), 10)]
        Image.fromarray(np.concatenate([r for r in rows if r.shape == rows[0].shape], axis=0)).save(samples)
    return {"concept_found": float(np.mean(found)), "concept_images": len(found),
            "ordinary": summarise(scores)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/fluxworks_concept_lora.safetensors")
    parser.add_argument("--json", default=None, help="write the measurements here")
    parser.add_argument("--token", default=TOKEN, help="the rare word that names the concept in captions")
    parser.add_argument("--images", type=int, default=30, help="heart pictures (at most 30 for the claim)")
    parser.add_argument("--hearts", type=int, default=1, choices=(1, 2, 3),
                        help="most hearts in one training picture (1: a heart, sometimes beside an ordinary shape)")
    parser.add_argument("--prior-images", type=int, default=64, help="base-model samples for prior preservation")
    parser.add_argument("--steps", type=int, default=SETTINGS.steps)
    parser.add_argument("--rank", type=int, default=SETTINGS.rank)
    parser.add_argument("--lr", type=float, default=SETTINGS.learning_rate)
    parser.add_argument("--batch", type=int, default=SETTINGS.batch_size)
    parser.add_argument("--layers", default=SETTINGS.lora_layers)
    parser.add_argument("--prior-weight", type=float, default=1.0)
    parser.add_argument("--logit-mean", type=float, default=SETTINGS.logit_mean,
                        help="centre of the timestep distribution (> 0: more high-noise steps, where shapes form)")
    parser.add_argument("--test-prompts", type=int, default=50, help="held-out token prompts")
    parser.add_argument("--ordinary", type=int, default=50, help="test-split captions (at most 50)")
    parser.add_argument("--seeds", type=int, default=2, help="samples per caption")
    parser.add_argument("--samples", default=None, help="save before/after sample grids as <this>_before.png, ...")
    parser.add_argument("--skip-before", action="store_true", help="measure the trained model only")
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    return parser.parse_args(argv)


def train(pipeline: EmbeddedPipeline, args: argparse.Namespace, settings: TrainSettings) -> dict:
    """Encode the data, train, save `args.out`; returns what happened (data sizes, seconds, losses)."""
    start = time.monotonic()
    images, captions = concept_data(args.images, settings.seed, args.token, args.hearts)
    text = encode_captions(pipeline, captions + [""])
    empty = len(captions)
    embeds, pooled = text.embeds[text.index[:empty]], text.pooled[text.index[:empty]]
    concept = CachedDataset.from_samples(list(image_latents(pipeline, images)), embeds, pooled, captions,
                                         text.embeds[text.index[empty]], text.pooled[text.index[empty]])
    prior = None
    if args.prior_images:
        prior_latents, prior_captions = prior_data(pipeline, args.prior_images, settings.seed + 1)
        prior_text = encode_captions(pipeline, prior_captions)
        prior = CachedDataset.from_samples(list(prior_latents), prior_text.embeds[prior_text.index],
                                           prior_text.pooled[prior_text.index], prior_captions,
                                           concept.empty_text, concept.empty_pooled)
    data_seconds = time.monotonic() - start
    start = time.monotonic()
    with LoraTrainer(pipeline.transformer, settings, pipeline.device) as trainer:
        losses = trainer.train(trainer.dataset_loss(concept, prior, args.prior_weight), checkpoint=args.out,
                               progress=lambda r: r.step % 50 == 0 and logger.info("step %d/%d loss %.4f lr %.2e",
                                                                                   r.step, r.steps, r.loss, r.lr))
    train_seconds = time.monotonic() - start
    logger.info("data %.1f s, training %.1f s", data_seconds, train_seconds)
    window = max(1, len(losses) // 10)
    return {"images": len(captions), "captions": captions, "hearts": args.hearts, "prior_images": args.prior_images,
            "prior_weight": args.prior_weight, "data_seconds": round(data_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "loss_first_tenth": float(np.mean(losses[:window])), "loss_last_tenth": float(np.mean(losses[-window:])),
            "losses_every_10": [round(x, 5) for x in losses[::10]]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = dataclasses.replace(SETTINGS, steps=args.steps, rank=args.rank, alpha=float(args.rank),
                                   learning_rate=args.lr, batch_size=args.batch, lora_layers=args.layers,
                                   logit_mean=args.logit_mean,
                                   lr_warmup_steps=min(SETTINGS.lr_warmup_steps, args.steps // 10))
    pipeline = load_base((args.clip_tokenizer, args.t5_tokenizer))
    _, train_captions = concept_data(args.images, settings.seed, args.token, args.hearts)
    prompts = concept_test_prompts(args.test_prompts, 7, set(train_captions), args.token)
    ordinary = test_captions(args.ordinary)
    prototypes = vae_prototypes(20, 3)
    logger.info("prototypes after the VAE round trip: %s", prototypes)
    report = {"evaluator": EVALUATOR, "token": args.token, "concept": CONCEPT, "settings": dataclasses.asdict(settings),
              "threads": torch.get_num_threads(), "sampler": {"steps": RECOMMENDED_STEPS, "guidance": 2.0},
              "prototypes": prototypes, "test_prompts": prompts, "seeds_per_caption": args.seeds}
    if not args.skip_before:
        report["before"] = measure(pipeline, prompts, ordinary, args.seeds, prototypes,
                                   args.samples and f"{args.samples}_before.png", args.token)
        logger.info("before: %s", report["before"])
    report["training"] = train(pipeline, args, settings)
    report["after"] = measure(with_lora(pipeline, args.out), prompts, ordinary, args.seeds, prototypes,
                              args.samples and f"{args.samples}_after.png", args.token)
    logger.info("after: %s", report["after"])
    if "before" in report:
        report["adherence_drop_points"] = round(100 * (report["before"]["ordinary"]["adherence"]
                                                       - report["after"]["ordinary"]["adherence"]), 2)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    logger.info("concept found: %s -> %.0f %%; adherence drop %s points", report.get("before", {}).get(
        "concept_found"), 100 * report["after"]["concept_found"], report.get("adherence_drop_points"))


if __name__ == "__main__":
    main()
