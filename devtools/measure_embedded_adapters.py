"""Measure the embedded model's example ControlNet and LoRA through a real ComfyUI server, with the shipped
example workflows (example_workflows/api/embedded_controlnet_canny.json, embedded_lora_stack.json), each run
with and without its adapter on the same captions and seeds.

ControlNet: each trial takes a held-out single-shape caption, renders the same shape at another grid cell,
uploads that picture and feeds it to the example's Canny Edges (LoadImage in place of the drawn square), so the
caption and the edges disagree about where the shape goes. A trial lands "at the control" when the caption
colour's largest region (evaluation.adherence) has its centroid in the edges' cell. Without the ControlNet the
same graph samples from the prompt alone.

LoRA: each trial prompts a diamond ("a large red diamond at the top left, on a green background") with and
without the LoRA row enabled. A drawn shape counts as a diamond when its (extent, solidity, centroid height) is
nearest to the diamond's among prototypes measured on VAE round trips of clean renders of all five shapes (what
this VAE can show is the reference, not the ideal polygon). Held-out ordinary captions check that the LoRA
leaves the rest of the model alone (adherence with and without it).

Usage: python -m devtools.measure_embedded_adapters --json embedded_model/adapter_measurements.json
(starts its own ComfyUI on the CPU; 20 trials each take about 10 minutes on two cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image

from devtools.comfy_server import ComfyServer
from devtools.embedded_examples import API_DIR, embedded_only_server
from evaluation.adherence import FEATURE_WEIGHTS, analyse, score_image
from evaluation.embedded import EMBEDDED_DIR, FILES, load_autoencoder
from training.shapes import (
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    held_out_captions,
    parse_caption,
    render,
)
from training.train_embedded_lora import NEW_SHAPE, diamond_scene
from training.train_embedded_lora import render as render_with_diamonds

logger = logging.getLogger(__name__)

CONTROLNET_EXAMPLE = "embedded_controlnet_canny"
LORA_EXAMPLE = "embedded_lora_stack"
SEED = 2024


def _load_api(name: str) -> dict:
    with open(os.path.join(API_DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def _node(prompt: dict, class_type: str) -> str:
    [node_id] = [k for k, n in prompt.items() if n["class_type"] == class_type]
    return node_id


def _run(server: ComfyServer, prompt: dict) -> np.ndarray:
    result = server.run(prompt)
    if result.status != "success":
        errors = [m["data"] for m in result.messages if m["type"] == "execution_error"]
        raise RuntimeError(f"the prompt failed: {errors}")
    save = _node(prompt, "SaveImage")
    [image] = [server.view_image(f) for f in result.outputs[save]["images"]]
    return np.asarray(image.convert("RGB"))


def _with_caption(prompt: dict, caption: str, seed: int) -> dict:
    out = copy.deepcopy(prompt)
    out[_node(out, "FluxWorksTextEncode")]["inputs"]["prompt"] = caption
    out[_node(out, "FluxWorksSampler")]["inputs"]["seed"] = seed
    return out


# --- ControlNet -------------------------------------------------------------------------------------------

def controlnet_trials(count: int, seed: int) -> list[tuple[str, Scene]]:
    """(caption, scene the edges show): held-out single-shape captions, the shape moved to another cell."""
    rng = np.random.default_rng(seed)
    captions = [c for c in held_out_captions(400, seed) if len(parse_caption(c).objects) == 1][:count]
    if len(captions) < count:
        raise ValueError(f"only {len(captions)} single-shape held-out captions among 400; ask for fewer trials")
    trials = []
    for caption in captions:
        scene = parse_caption(caption)
        [obj] = scene.objects
        others = [p for p in POSITIONS if p != obj.position]
        moved = ShapeObject(obj.shape, obj.colour, obj.size, others[int(rng.integers(len(others)))])
        trials.append((caption, Scene((moved,), scene.background)))
    return trials


def measure_controlnet(server: ComfyServer, count: int, seed: int) -> dict:
    example = _load_api(CONTROLNET_EXAMPLE)
    drawn = _node(example, "ImageCompositeMasked")
    canny, sampler, encode = (_node(example, t) for t in ("FluxWorksCannyEdges", "FluxWorksSampler",
                                                          "FluxWorksTextEncode"))
    rng = np.random.default_rng(seed)
    records = []
    for i, (caption, shown) in enumerate(controlnet_trials(count, seed)):
        name = server.upload_image(Image.fromarray(render(shown, rng)), f"control_{i}.png")
        with_control = _with_caption(example, caption, seed + i)
        with_control["control_picture"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        with_control[canny]["inputs"]["image"] = ["control_picture", 0]
        for node in [k for k, n in with_control.items() if k != drawn and n["class_type"] in ("EmptyImage",)]:
            del with_control[node]
        del with_control[drawn]
        without = copy.deepcopy(with_control)
        without[sampler]["inputs"]["positive"] = [encode, 0]
        [obj] = parse_caption(caption).objects
        record = {"caption": caption, "control_position": shown.objects[0].position, "seed": seed + i}
        for label, prompt in (("with", with_control), ("without", without)):
            _, found = analyse(_run(server, prompt))
            seen = found.get(obj.colour)
            record[label] = None if seen is None else {"position": seen.position, "shape": seen.shape,
                                                       "size": seen.size}
        records.append(record)
        logger.info("controlnet trial %d: %s", i, record)

    def share(label: str, key: str, expected) -> float:
        return float(np.mean([r[label] is not None and r[label][key] == expected(r) for r in records]))

    summary = {
        label: {
            "at_control_position": share(label, "position", lambda r: r["control_position"]),
            "at_caption_position": share(label, "position", lambda r: parse_caption(r["caption"]).objects[0].position),
            "shape_as_captioned": share(label, "shape", lambda r: parse_caption(r["caption"]).objects[0].shape),
            "colour_found": float(np.mean([r[label] is not None for r in records])),
        } for label in ("with", "without")
    }
    return {"trials": count, "summary": summary, "records": records}


# --- LoRA -------------------------------------------------------------------------------------------------

@torch.no_grad()
def vae_prototypes(per_shape: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Mean (extent, solidity, centroid height) of each shape after the embedded VAE's round trip."""
    vae = load_autoencoder(os.path.join(EMBEDDED_DIR, FILES["vae"]))
    rng = np.random.default_rng(seed)
    prototypes = {}
    for shape in (*SHAPES, NEW_SHAPE):
        pictures, colours = [], []
        while len(pictures) < per_shape:
            scene = diamond_scene(rng)
            base = scene.objects[0] if scene.objects[0].shape == NEW_SHAPE else scene.objects[-1]
            obj = ShapeObject(shape, base.colour, base.size, base.position)
            pictures.append(render_with_diamonds(Scene((obj,), scene.background), rng))
            colours.append(obj.colour)
        x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        back = ((vae.decode(vae.encode(x)).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        features = [analyse(p)[1][c].features for p, c in zip(back, colours, strict=True) if c in analyse(p)[1]]
        prototypes[shape] = tuple(float(v) for v in np.mean(features, axis=0))
    return prototypes


def nearest_shape(features, prototypes: dict[str, tuple[float, float, float]]) -> str:
    f = np.array(features)
    return min(prototypes, key=lambda s: float(np.sum((FEATURE_WEIGHTS * (f - np.array(prototypes[s]))) ** 2)))


def measure_lora(server: ComfyServer, count: int, seed: int, strength: float | None = None) -> dict:
    """`strength`: the LoRA row's strength (default: the example's)."""
    example = _load_api(LORA_EXAMPLE)
    stack = _node(example, "FluxWorksLoraStack")
    rows = json.loads(example[stack]["inputs"]["rows"])
    if strength is not None:
        rows = [{**r, "strength": strength} for r in rows]
        example[stack]["inputs"]["rows"] = json.dumps(rows, separators=(",", ":"))
    off = copy.deepcopy(example)
    off[stack]["inputs"]["rows"] = json.dumps([{**r, "enabled": False} for r in rows], separators=(",", ":"))
    prototypes = vae_prototypes(40, seed)
    logger.info("shape prototypes after the VAE round trip: %s", prototypes)
    rng = np.random.default_rng(seed)
    diamonds = []
    while len(diamonds) < count:
        scene = diamond_scene(rng)
        if len(scene.objects) == 1:
            diamonds.append(scene.caption())
    records = []
    for i, caption in enumerate(diamonds):
        colour = caption.split(" diamond")[0].split()[-1]
        record = {"caption": caption, "seed": seed + i}
        for label, prompt in (("with", example), ("without", off)):
            _, found = analyse(_run(server, _with_caption(prompt, caption, seed + i)))
            seen = found.get(colour)
            record[label] = None if seen is None else {"shape": nearest_shape(seen.features, prototypes),
                                                       "features": seen.features}
        records.append(record)
        logger.info("lora trial %d: %s", i, record)
    ordinary = held_out_captions(count, seed)
    scores = {"with": [], "without": []}
    for i, caption in enumerate(ordinary):
        for label, prompt in (("with", example), ("without", off)):
            scores[label].append(score_image(_run(server, _with_caption(prompt, caption, seed + i)), caption).score)
    summary = {
        label: {
            "diamond": float(np.mean([r[label] is not None and r[label]["shape"] == NEW_SHAPE for r in records])),
            "mean_features": [float(v) for v in np.mean([r[label]["features"] for r in records if r[label]], axis=0)],
            "adherence_on_ordinary_captions": float(np.mean(scores[label])),
        } for label in ("with", "without")
    }
    return {"trials": count, "strength": rows[0]["strength"], "prototypes": prototypes, "summary": summary,
            "records": records,
            "ordinary_captions": ordinary, "ordinary_scores": scores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--only", choices=("controlnet", "lora"), default=None)
    parser.add_argument("--lora-strength", type=float, default=None, help="default: the example's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = tempfile.mkdtemp(prefix="fluxworks-measure-")
    server = embedded_only_server(root)
    report = {}
    try:
        if args.only in (None, "controlnet"):
            report["controlnet"] = measure_controlnet(server, args.trials, args.seed)
            logger.info("controlnet: %s", report["controlnet"]["summary"])
        if args.only in (None, "lora"):
            report["lora"] = measure_lora(server, args.trials, args.seed, args.lora_strength)
            logger.info("lora: %s", report["lora"]["summary"])
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
