"""The generated pictures in docs/, made through a real ComfyUI server so that each PNG carries the workflow that
made it ("prompt" and "workflow" text chunks, as SaveImage writes them): drop one on the ComfyUI canvas to get
its graph back.

- docs/demo.png: `make demo` (devtools/demo.py), the embedded text-to-image example as shipped.
- docs/embedded_model_demo.png: that example at seed 0, scaled to 256 px (nearest neighbour) before saving.
- docs/embedded_model_samples.png: the first 10 held-out validation captions, target render above the model at
  guidance 1 and at the recommended guidance 2 (CPU, noise seeds 1000-1009). The two model rows come from one
  workflow (a sampler per caption and guidance, each row batched into one SaveImage); the target row is drawn by
  training/shapes.py, which no ComfyUI node does, so the sheet is put together here and the workflow chunk holds
  the graph of its model rows.

Usage: python -m devtools.docs_pictures [--out docs]   (starts its own ComfyUI on the CPU; a few minutes)
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from devtools.comfy_server import ComfyServer
from devtools.demo import write_demo
from devtools.embedded_examples import (
    EMBEDDED_FILES,
    EXAMPLES_DIR,
    GUIDANCE,
    SIZE,
    STEPS,
    T5_LENGTH,
    add_node,
    connect,
    embedded_only_server,
    find,
    run_with_workflow,
    set_order,
    set_widgets,
)
from devtools.workflow_format import ui_to_api
from evaluation.benchmark import picture_grid
from evaluation.splits import CAPTION_SEED, NOISE_SEED, validation_captions
from training.shapes import parse_caption, render

logger = logging.getLogger(__name__)

DEMO_EXAMPLE = "embedded_text_to_image"
SAMPLE_COUNT = 10
SAMPLE_GUIDANCE = (1.0, GUIDANCE)
PICTURES = ("demo.png", "embedded_model_demo.png", "embedded_model_samples.png")


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _saved(server: ComfyServer, result, node: dict) -> list[bytes]:
    """The PNG files one SaveImage node wrote, as bytes (text chunks included)."""
    if result.status != "success":
        errors = [m["data"] for m in result.messages if m["type"] == "execution_error"]
        raise RuntimeError(f"the prompt failed: {errors}\n{server.log()[-3000:]}")
    return [server.view(f) for f in result.outputs[str(node["id"])]["images"]]


def scaled_demo_workflow(object_info: dict, seed: int = 0, size: int = 2 * SIZE) -> dict:
    """The text-to-image example at `seed`, its picture scaled to `size` px (nearest) before it is saved."""
    workflow = copy.deepcopy(_read(os.path.join(EXAMPLES_DIR, DEMO_EXAMPLE + ".json")))
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=seed)
    decode, save = find(workflow, "VAEDecode"), find(workflow, "SaveImage")
    scale = add_node(workflow, object_info, "ImageScale", [decode["pos"][0], decode["pos"][1] + 700], [520, 130],
                     f"Nearest-neighbour x{size // SIZE}", upscale_method="nearest-exact", width=size, height=size,
                     crop="disabled")
    connect(workflow, decode, 0, scale, "image")
    connect(workflow, scale, 0, save, "images")
    set_widgets(save, object_info, filename_prefix="FluxWorks/embedded_model_demo")
    set_order(workflow)
    return workflow


def samples_workflow(object_info: dict, captions: list[str]) -> dict:
    """One graph for the sheet's model rows: per caption a prompt and a sampler per guidance value (noise seed
    NOISE_SEED + i, 12 steps), decoded, each row batched into one SaveImage in caption order."""
    workflow = {"id": "00000000-0000-0000-0000-0000000000f1", "revision": 0, "last_node_id": 0, "last_link_id": 0,
                "nodes": [], "links": [], "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.35, "offset": [40, 40]}}, "version": 0.4}
    model = add_node(workflow, object_info, "FluxWorksModelLoader", [40, 40], [323, 82],
                     model_name=EMBEDDED_FILES["model_name"])
    encoders = add_node(workflow, object_info, "FluxWorksTextEncoderLoader", [40, 200], [323, 106],
                        t5_name=EMBEDDED_FILES["t5_name"], clip_name=EMBEDDED_FILES["clip_name"])
    vae = add_node(workflow, object_info, "VAELoader", [40, 380], [323, 58], vae_name=EMBEDDED_FILES["vae_name"])
    latent = add_node(workflow, object_info, "EmptySD3LatentImage", [40, 520], [323, 106], width=SIZE, height=SIZE,
                      batch_size=1)
    rows: list[list[dict]] = [[] for _ in SAMPLE_GUIDANCE]
    for i, caption in enumerate(captions):
        x = 440 + i * 400
        encode = add_node(workflow, object_info, "FluxWorksTextEncode", [x, 40], [360, 200], f"Caption {i + 1}",
                          prompt=caption, clip_prompt="", max_sequence_length=T5_LENGTH)
        connect(workflow, encoders, 0, encode, "text_encoder")
        for row, guidance in enumerate(SAMPLE_GUIDANCE):
            y = 320 + row * 560
            sampler = add_node(workflow, object_info, "FluxWorksSampler", [x, y], [360, 262],
                               f"Guidance {guidance:g}", seed=NOISE_SEED + i, control_after_generate="fixed",
                               steps=STEPS, guidance=guidance, shift=0.0, denoise=1.0)
            connect(workflow, model, 0, sampler, "model")
            connect(workflow, encode, 0, sampler, "positive")
            connect(workflow, latent, 0, sampler, "latent_image")
            decode = add_node(workflow, object_info, "VAEDecode", [x, y + 330], [360, 46])
            connect(workflow, sampler, 0, decode, "samples")
            connect(workflow, vae, 0, decode, "vae")
            rows[row].append(decode)
    for row, (guidance, decodes) in enumerate(zip(SAMPLE_GUIDANCE, rows, strict=True)):
        y = 1500 + row * 200
        batch = decodes[0]
        for i, decode in enumerate(decodes[1:], start=1):
            joined = add_node(workflow, object_info, "ImageBatch", [440 + i * 400, y], [360, 46])
            connect(workflow, batch, 0, joined, "image1")
            connect(workflow, decode, 0, joined, "image2")
            batch = joined
        save = add_node(workflow, object_info, "SaveImage", [440 + len(captions) * 400, y], [360, 100],
                        f"Row: guidance {guidance:g}", filename_prefix=f"FluxWorks/samples_guidance_{guidance:g}")
        connect(workflow, batch, 0, save, "images")
    set_order(workflow)
    return workflow


def write_samples_sheet(server: ComfyServer, object_info: dict, path: str) -> None:
    captions = validation_captions(SAMPLE_COUNT)
    workflow = samples_workflow(object_info, captions)
    prompt = ui_to_api(workflow, object_info)
    result = run_with_workflow(server, prompt, workflow, timeout=3600.0)  # 20 samplers: minutes on a busy CPU
    saves = [n for n in workflow["nodes"] if n["type"] == "SaveImage"]
    rows = [np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in _saved(server, result, save)])
            for save in saves]
    rng = np.random.default_rng(CAPTION_SEED)
    targets = np.stack([render(parse_caption(c), rng) for c in captions])
    sheet = picture_grid([targets, *rows], [
        "rows: target render of the caption; model, guidance 1; model, recommended "
        f"({STEPS} steps, guidance {GUIDANCE:g}); held-out captions 1-{len(captions)} of the benchmark, left to "
        "right"], scale=1)
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    sheet.save(path, pnginfo=info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--pictures", nargs="*", choices=PICTURES, default=list(PICTURES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = tempfile.mkdtemp(prefix="fluxworks-docs-")
    server = embedded_only_server(root)
    try:
        object_info = server.get_json("/object_info")
        for name in args.pictures:
            path = os.path.join(args.out, name)
            if name == "demo.png":
                write_demo(server, path)
            elif name == "embedded_model_demo.png":
                workflow = scaled_demo_workflow(object_info)
                result = run_with_workflow(server, ui_to_api(workflow, object_info), workflow)
                [png] = _saved(server, result, find(workflow, "SaveImage"))
                with open(path, "wb") as f:
                    f.write(png)
            else:
                write_samples_sheet(server, object_info, path)
            logger.info("wrote %s", path)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
