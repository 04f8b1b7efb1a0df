"""Regional prompts measured on the embedded model: does each region's object appear inside its region
(placement) and nowhere else (leak)?

Layouts come from held-out captions with 2-3 objects: each object becomes a region whose mask is its 3x3 grid
cell, and whose prompt is the single-object caption "<object phrase with its position>, on a <colour>
background" (the embedded model only knows captions of that grammar, so a region prompt keeps its position words;
see `region_prompt`). Validation layouts choose settings (`validation_captions`), test layouts report: the
2-3-object captions among the test split extended past its 50 captions with further held-out captions
(`held_out_captions`), which nothing else has used.

Three ways to ask for the same layout, all sampled with the recommended embedded settings on the same seeds:
- `global`: the whole caption as one prompt (no regions);
- `core_blend`: core ComfyUI's ConditioningSetMask path, emulated: core KSampler cannot load the embedded
  transformer (its width is not FLUX.1's), so this runs, per step, one forward for the global prompt (weight 1
  everywhere) and one per region prompt (weight = its mask resized to the latent bilinearly, times strength) and
  blends the predictions by those weights, as `comfy.samplers` `calc_cond_batch` / `get_area_and_mult` /
  `resolve_areas_and_cond_masks_multidim` do for masks with set_cond_area "default";
- `regional`: FluxWorks' joint-attention mask (flux_sampler.regional) through `sample_prepared`.

Scoring uses the adherence evaluator's detector (evaluation.adherence.detect): per region, placement = an object
of the region's colour and shape is detected with its centroid inside the region; leak = an object of the region's
colour is detected with its centroid outside it. `placement_colour` counts colour only.

    OMP_NUM_THREADS=1 nice python -m evaluation.regional --split test --out docs/bench/regional_test.json
    python -m evaluation.regional --split test --count 6 --windows 0.5 --blocks double --grid \
        --out docs/img/regional_grid.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from evaluation.adherence import EVALUATOR, detect, score_image
from evaluation.embedded import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, EmbeddedPipeline
from evaluation.splits import CAPTION_SEED, SPLIT_SIZE, noise_seeds, validation_captions
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.latents import LATENT_CHANNELS, make_noise, to_vae_space
from fluxworks.flux_sampler.regional import RegionalConditioning, RegionalSettings
from fluxworks.flux_sampler.sampling import FluxDenoiser, TextConditioning, sample_euler
from fluxworks.flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len
from fluxworks.flux_speed.prepare import SpeedOptions, sample_prepared
from training.shapes import IMAGE_SIZE, POSITIONS, Scene, ShapeObject, held_out_captions, parse_caption, render

METHODS = ("global", "core_blend", "regional")
# Not a way of asking: the layout's own render (training.shapes, the seed's jitter) through the embedded VAE and back,
# scored the same way. No sampler can place what the autoencoder cannot show, so this is the ceiling of placement.
CEILING = "vae_round_trip"
LATENT = IMAGE_SIZE // 8


@dataclass(frozen=True)
class Layout:
    caption: str
    scene: Scene

    @property
    def objects(self) -> tuple[ShapeObject, ...]:
        return self.scene.objects


def layouts(split: str, count: int) -> list[Layout]:
    """The first `count` held-out 2-3-object layouts of `split` ("validation" or "test"; see module docstring)."""
    if split == "validation":
        captions = validation_captions()
    elif split == "test":
        captions = held_out_captions(2 * SPLIT_SIZE + 4 * count, CAPTION_SEED)[SPLIT_SIZE:]
    else:
        raise ValueError(f"unknown split {split!r}; use validation or test")
    found = [Layout(c, parse_caption(c)) for c in captions if len(parse_caption(c).objects) >= 2]
    if len(found) < count:
        raise ValueError(f"the {split} split has {len(found)} layouts of 2-3 objects; asked for {count}")
    return found[:count]


def cell_box(position: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in pixels of a grid cell."""
    row, col = POSITIONS[position]
    third = IMAGE_SIZE / 3
    return col * third, row * third, (col + 1) * third, (row + 1) * third


def cell_mask(position: str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(size, size) float mask, 1 on the pixels whose centre lies inside the grid cell."""
    x0, y0, x1, y1 = (v * size / IMAGE_SIZE for v in cell_box(position))
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    rows = (centres >= y0) & (centres < y1)
    cols = (centres >= x0) & (centres < x1)
    return (rows[:, None] & cols[None, :]).float()


def region_prompt(obj: ShapeObject, background: str, position: str | None = None) -> str:
    """The single-object caption for a region: the object at `position` (default: its own cell)."""
    return Scene((ShapeObject(obj.shape, obj.colour, obj.size, position or obj.position),), background).caption()


def node_rows(layout: Layout, region_position: str | None = None) -> list[dict]:
    """The layout as FluxWorks Regional Prompt's `regions` rows: each object's grid cell as a rectangle (fractions
    of the image) with its region prompt."""
    rows = []
    for obj in layout.objects:
        row, col = POSITIONS[obj.position]
        rows.append({"prompt": region_prompt(obj, layout.scene.background, region_position),
                     "x": col / 3, "y": row / 3, "w": 1 / 3, "h": 1 / 3})
    return rows


def inside(centroid: tuple[float, float], position: str) -> bool:
    x0, y0, x1, y1 = cell_box(position)
    return x0 <= centroid[0] < x1 and y0 <= centroid[1] < y1


def score_regions(image: np.ndarray, layout: Layout) -> list[dict]:
    """Per region: placement (its colour and shape found inside), placement_colour, leak (its colour outside)."""
    _, objects = detect(image)
    rows = []
    for obj in layout.objects:
        found = objects.get(obj.colour, [])
        rows.append({
            "colour": obj.colour, "shape": obj.shape, "position": obj.position,
            "placement": any(o.shape == obj.shape and inside(o.centroid, obj.position) for o in found),
            "placement_colour": any(inside(o.centroid, obj.position) for o in found),
            "leak": any(not inside(o.centroid, obj.position) for o in found),
        })
    return rows


class RegionalBench:
    """Samples the three methods on the embedded model (CPU, fp32, the recommended steps and guidance)."""

    def __init__(self, pipe: EmbeddedPipeline, steps: int = RECOMMENDED_STEPS,
                 guidance: float = RECOMMENDED_GUIDANCE) -> None:
        self.pipe, self.steps = pipe, steps
        self.curve = GuidanceCurve.constant(guidance)
        self.sigmas = get_sigmas(steps, calculate_mu(image_seq_len(LATENT, LATENT)) if pipe.guidance_embeds else None)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        return torch.cat([make_noise((1, LATENT_CHANNELS, LATENT, LATENT), s) for s in seeds])

    def conditionings(self, layout: Layout, global_prompt: str | None,
                      region_position: str | None) -> tuple[TextConditioning, list[tuple[TextConditioning,
                                                                                             torch.Tensor]]]:
        base = self.pipe.encode([global_prompt or layout.caption])
        regions = [(self.pipe.encode([region_prompt(o, layout.scene.background, region_position)]),
                    cell_mask(o.position)) for o in layout.objects]
        return base, regions

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return self.pipe.decode(to_vae_space(x))

    @torch.no_grad()
    def global_prompt(self, layout: Layout, seeds: list[int]) -> np.ndarray:
        return self.pipe.generate([layout.caption] * len(seeds), seeds, self.steps, self.curve)

    @torch.no_grad()
    def regional(self, layout: Layout, seeds: list[int], settings: RegionalSettings,
                 global_prompt: str | None = None, region_position: str | None = None) -> np.ndarray:
        base, regions = self.conditionings(layout, global_prompt, region_position)
        cond = RegionalConditioning.build(base, [(c, m, 1.0) for c, m in regions], settings)
        noise = self.noise(seeds)
        pipe = self.pipe
        x, _, _ = sample_prepared(pipe.transformer, SpeedOptions.defaults_for(pipe.device), pipe.device,
                                  pipe.compute_dtype, guidance_embeds=pipe.guidance_embeds, positive=cond,
                                  negative=None, latent=torch.zeros_like(noise), noise=noise, sigmas=self.sigmas,
                                  curve=self.curve)
        return self.decode(x)

    @torch.no_grad()
    def core_blend(self, layout: Layout, seeds: list[int], global_prompt: str | None = None,
                   region_position: str | None = None) -> np.ndarray:
        """Core's ConditioningSetMask blend (module docstring): per step one forward per conditioning, predictions
        averaged with weights 1 (global) and the bilinear latent-size masks (regions)."""
        base, regions = self.conditionings(layout, global_prompt, region_position)
        pipe = self.pipe
        denoisers = [FluxDenoiser(pipe.transformer, c, None, self.curve, self.steps, pipe.guidance_embeds,
                                  pipe.compute_dtype) for c in [base] + [c for c, _ in regions]]
        masks = [torch.ones(1, 1, LATENT, LATENT)] + [
            torch.nn.functional.interpolate(m[None, None], size=(LATENT, LATENT), mode="bilinear",
                                            align_corners=False) for _, m in regions]

        def blended(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
            total = torch.zeros_like(x)
            count = torch.full_like(x, 1e-37)
            for denoiser, mask in zip(denoisers, masks, strict=True):
                total += denoiser(x, sigma, step) * mask
                count += mask
            return total / count

        x = sample_euler(blended, self.noise(seeds), self.sigmas)
        return self.decode(x)


def summarise(rows: list[dict]) -> dict:
    regions = [r for row in rows for r in row["regions"]]
    return {
        "placement": float(np.mean([r["placement"] for r in regions])),
        "placement_colour": float(np.mean([r["placement_colour"] for r in regions])),
        "leak": float(np.mean([r["leak"] for r in regions])),
        "layouts_all_placed_no_leak": float(np.mean([all(r["placement"] and not r["leak"] for r in row["regions"])
                                                     for row in rows])),
        "adherence": float(np.mean([row["adherence"] for row in rows])),
        "regions": len(regions),
        "images": len(rows),
    }


def run(bench: RegionalBench, items: list[Layout], seeds_per_layout: int, method: str,
        settings: RegionalSettings | None = None, global_prompt_of=None, region_position: str | None = None,
        images_out: dict | None = None) -> dict:
    """Sample and score `method` on `items`; returns the summary plus per-image rows."""
    rows = []
    start = time.time()
    for i, layout in enumerate(items):
        seeds = [noise_seeds(len(items), r)[i] for r in range(seeds_per_layout)]
        gp = global_prompt_of(layout) if global_prompt_of else None
        if method == "global":
            images = bench.global_prompt(layout, seeds)
        elif method == "core_blend":
            images = bench.core_blend(layout, seeds, gp, region_position)
        elif method == "regional":
            images = bench.regional(layout, seeds, settings or RegionalSettings(), gp, region_position)
        elif method == CEILING:
            images = bench.pipe.reconstruct(np.stack([render(layout.scene, np.random.default_rng(s)) for s in seeds]))
        else:
            raise ValueError(f"unknown method {method!r}; use one of {(*METHODS, CEILING)}")
        for seed, image in zip(seeds, images, strict=True):
            rows.append({"caption": layout.caption, "seed": seed, "regions": score_regions(image, layout),
                         "adherence": score_image(image, layout.caption).score})
            if images_out is not None:
                images_out[(layout.caption, seed)] = image
    return {"method": method, "seconds": round(time.time() - start, 1), **summarise(rows), "rows": rows}


def example_grid(bench: RegionalBench, items: list[Layout], path: str, settings: RegionalSettings,
                 scale: int = 2) -> None:
    """A picture of `items` (rows), one seed each (repeat 0, as `run` numbers them): the layout asked for (a render
    with its region cells outlined), then the global caption, core's blend (emulated) and ours, each panel
    `scale`x larger (nearest neighbour) with the region cells outlined and placement marks under it."""
    from PIL import Image, ImageDraw

    columns = ("layout asked for", "global caption", "core blend", "FluxWorks regional")
    images = {method: {} for method in METHODS}
    for method in METHODS:
        run(bench, items, 1, method, settings if method == "regional" else None, images_out=images[method])
    size, label_h = IMAGE_SIZE * scale, 16
    sheet = Image.new("RGB", (len(columns) * (size + 4) + 4, 20 + len(items) * (size + label_h + 4)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(columns):
        draw.text((4 + c * (size + 4) + 4, 4), title, fill=(230, 230, 230))
    for r, layout in enumerate(items):
        seed = noise_seeds(len(items), 0)[r]
        target = render(layout.scene, np.random.default_rng(seed))
        panels = [(target, None)] + [(images[m][(layout.caption, seed)], m) for m in METHODS]
        for c, (image, method) in enumerate(panels):
            x, y = 4 + c * (size + 4), 20 + r * (size + label_h + 4)
            sheet.paste(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST), (x, y))
            for obj in layout.objects:
                x0, y0, x1, y1 = (v * scale for v in cell_box(obj.position))
                draw.rectangle([x + x0, y + y0, x + x1 - 1, y + y1 - 1], outline=(255, 255, 255))
            if method is not None:
                marks = ["ok" if row["placement"] and not row["leak"] else ("leak" if row["leak"] else "miss")
                         for row in score_regions(image, layout)]
                text = " ".join(f"{o.colour} {o.shape}: {m}" for o, m in zip(layout.objects, marks, strict=True))
                draw.text((x + 2, y + size + 2), text, fill=(200, 200, 200))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


def main() -> None:
    from tests.paths import tokenizer_folders

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}, {CEILING}")
    parser.add_argument("--windows", default="1.0", help="regional end_percent values to sweep, comma-separated")
    parser.add_argument("--blocks", default="all", help="regional block sets to sweep, comma-separated")
    parser.add_argument("--region-position", default=None,
                        help="write every region prompt at this position (e.g. center) instead of its own cell")
    parser.add_argument("--out", required=True, help="the JSON report, or with --grid the PNG")
    parser.add_argument("--grid", action="store_true",
                        help="write a picture of the layouts (one seed; first --windows/--blocks settings) instead")
    args = parser.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in (*METHODS, CEILING)]
    if unknown:  # before minutes of sampling, not after them
        parser.error(f"unknown --methods {unknown}; choose from {', '.join((*METHODS, CEILING))}")
    torch.manual_seed(0)
    pipe = EmbeddedPipeline.load(tokenizer_folders())
    bench = RegionalBench(pipe)
    items = layouts(args.split, args.count)
    if args.grid:
        settings = RegionalSettings(0.0, float(args.windows.split(",")[0]), args.blocks.split(",")[0])
        example_grid(bench, items, args.out, settings)
        return
    results = []
    for method in args.methods.split(","):
        if method != "regional":
            results.append(run(bench, items, args.seeds, method, region_position=args.region_position))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "rows"}), flush=True)  # noqa: T201
            continue
        for end in args.windows.split(","):
            for blocks in args.blocks.split(","):
                settings = RegionalSettings(0.0, float(end), blocks)
                result = run(bench, items, args.seeds, method, settings, region_position=args.region_position)
                result["settings"] = asdict(settings)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)  # noqa: T201
    report = {"evaluator": EVALUATOR, "split": args.split, "layouts": len(items), "seeds_per_layout": args.seeds,
              "steps": bench.steps, "guidance": RECOMMENDED_GUIDANCE, "region_position": args.region_position,
              "device": str(pipe.device), "torch": torch.__version__, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
