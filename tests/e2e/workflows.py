"""API-format workflows for the e2e tests: the shipped examples adapted to the tiny models, and small builders.

The examples in example_workflows/api/ name the real files (flux1-dev.safetensors, t5xxl_fp16.safetensors...)
and real sizes (1024x1024, 20-28 steps). `adapt_to_tiny_models` keeps the graph and every other input, swaps
in the tiny models the test server holds, and shrinks size, steps and T5 length so a CPU runs it in seconds.
"""

from __future__ import annotations

import copy
import glob
import json
import os
from dataclasses import dataclass

import torch

from devtools.tiny_models import TINY_FLUX, write_flux
from tests.paths import REPO

API_EXAMPLES_DIR = os.path.join(REPO, "example_workflows", "api")

# Real file name in an example -> role in `ComfyServer.model_names` (devtools.tiny_models.write_models_tree).
CANONICAL_MODELS = {
    "flux1-dev.safetensors": "dev",
    "flux1-schnell.safetensors": "schnell",
    "t5xxl_fp16.safetensors": "t5",
    "clip_l.safetensors": "clip_l",
    "ae.safetensors": "vae",
}
# Further names the examples use, for roles that `add_example_models` adds.
EXTRA_CANONICAL_MODELS = {"flux-controlnet-canny.safetensors": "controlnet_canny"}
# Inputs that name a model file (ours and core's loaders).
MODEL_INPUTS = frozenset({"model_name", "unet_name", "t5_name", "clip_name", "clip_name1", "clip_name2",
                          "vae_name", "ckpt_name", "control_net_name"})
# Core's own loaders cannot read the 2-head tiny transformer (see `write_core_width_flux`).
CORE_MODEL_LOADERS = frozenset({"UNETLoader", "CheckpointLoaderSimple"})
EMPTY_LATENT_NODES = frozenset({"EmptySD3LatentImage", "EmptyLatentImage"})
SIZE_NODES = EMPTY_LATENT_NODES | {"ModelSamplingFlux", "ImageScale"}
TINY_STEPS = 2
SHRINK = 16  # 1024 px -> 64 px


@dataclass(frozen=True)
class TinyWorkflow:
    """An API prompt ready for the test server, and what its images must look like."""

    name: str
    prompt: dict
    width: int
    height: int
    batch: int


# The embedded-model twins (example_workflows/embedded_*) run as shipped on a server without other models
# (tests/e2e/test_embedded_examples.py); they have nothing to adapt.
EMBEDDED_PREFIX = "embedded_"


def api_examples() -> list[str]:
    """The API-format examples written for real FLUX.1 files (the embedded-model twins left out)."""
    return sorted(p for p in glob.glob(os.path.join(API_EXAMPLES_DIR, "*.json"))
                  if not os.path.basename(p).startswith(EMBEDDED_PREFIX))


def _tiny_size(pixels: int) -> int:
    """1/16 of the size, rounded to FLUX.1's multiple of 16 (at least 16)."""
    return max(16, round(pixels / SHRINK / 16) * 16)


def _tiny_model(node_id: str, node: dict, key: str, value: str, model_names: dict[str, str], name: str) -> str:
    known = {**CANONICAL_MODELS, **EXTRA_CANONICAL_MODELS}
    role = known.get(value)
    if role is None:
        raise ValueError(f"{name}: node {node_id} ({node['class_type']}) input {key} names {value!r}, which has no "
                         f"tiny test model; known names: {sorted(known)}")
    if node["class_type"] in CORE_MODEL_LOADERS:
        role += "_core"
    if role not in model_names:
        raise ValueError(f"{name}: node {node_id} ({node['class_type']}) needs the tiny model {role!r} for {value!r}, "
                         f"but the server only has {sorted(model_names)}")
    return model_names[role]


def adapt_to_tiny_models(prompt: dict, model_names: dict[str, str], name: str = "workflow") -> TinyWorkflow:
    """A copy of `prompt` on the tiny models, at 1/16 size, at most TINY_STEPS steps and 256 T5 tokens.

    The image size and batch come from the empty latent, or from an ImageScale (img2img) when there is none.
    Raises ValueError for a model file it has no tiny stand-in for, and for a graph whose image size it
    cannot tell.
    """
    prompt = copy.deepcopy(prompt)
    latents: set[tuple[int, int, int]] = set()
    scaled: set[tuple[int, int, int]] = set()
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        for key, value in inputs.items():
            if key in MODEL_INPUTS and isinstance(value, str):
                inputs[key] = _tiny_model(node_id, node, key, value, model_names, name)
        if node["class_type"] in SIZE_NODES:
            for key in ("width", "height"):
                if isinstance(inputs.get(key), int):
                    inputs[key] = _tiny_size(inputs[key])
        if node["class_type"] in EMPTY_LATENT_NODES:
            latents.add((inputs["width"], inputs["height"], inputs.get("batch_size", 1)))
        elif node["class_type"] == "ImageScale":
            scaled.add((inputs["width"], inputs["height"], 1))
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], TINY_STEPS)
        if inputs.get("max_sequence_length") == "512":  # halves the text tokens a core-width model attends to
            inputs["max_sequence_length"] = "256"
    sizes = latents or scaled
    if len(sizes) != 1:
        raise ValueError(f"{name}: expected one empty latent (or one ImageScale) to tell the image size, "
                         f"found {sorted(sizes)}")
    [(width, height, batch)] = sizes
    return TinyWorkflow(name, prompt, width, height, batch)


def input_images(prompt: dict) -> set[str]:
    """Names of the input/ files LoadImage nodes read."""
    return {n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"}


def write_training_folder(folder: str, count: int, stem: str = "picture") -> None:
    """A LoRA training folder as a user's holds it (<stem>_<i>.png + .txt pairs): the embedded concept's pictures,
    captioned with the token "ciel"."""
    from PIL import Image

    from training.train_embedded_concept import concept_data

    os.makedirs(folder, exist_ok=True)
    images, captions = concept_data(count, 0, "ciel")
    for i, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(pixels).save(os.path.join(folder, f"{stem}_{i}.png"))
        with open(os.path.join(folder, f"{stem}_{i}.txt"), "w", encoding="utf-8") as f:
            f.write(caption)


def save_image_nodes(prompt: dict) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]


def load_api_example(path: str, model_names: dict[str, str]) -> TinyWorkflow:
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    return adapt_to_tiny_models(prompt, model_names, os.path.basename(path))


# --- builders for graphs the examples do not cover ---------------------------------------------------

SAMPLER = "sampler"  # node id of FluxWorksSampler in `text_to_image`
DECODE = "decode"
LATENT_OUT = "save_latent"  # core SaveLatent on the sampler output in `text_to_image`


def text_encoders(names: dict[str, str], text: str = "a red circle on a blue square") -> dict:
    """Loader + encode nodes; CONDITIONING is ["encode", 0]."""
    return {
        "text_encoder": {"class_type": "FluxWorksTextEncoderLoader",
                         "inputs": {"t5_name": names["t5"], "clip_name": names["clip_l"], "weight_dtype": "default"}},
        "encode": {"class_type": "FluxWorksTextEncode",
                   "inputs": {"text_encoder": ["text_encoder", 0], "prompt": text, "clip_prompt": "",
                              "max_sequence_length": "256"}},
    }


def decode_and_save(names: dict[str, str], latent: list, prefix: str) -> dict:
    """Core VAELoader + VAEDecode + SaveImage on a LATENT output."""
    return {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": prefix}},
    }


def text_to_image(names: dict[str, str], *, seed: int, steps: int = TINY_STEPS, width: int = 64, height: int = 64,
                  batch: int = 1, model: str = "dev", text: str = "a red circle on a blue square",
                  prefix: str = "e2e") -> dict:
    """FluxWorks loaders -> FluxWorksSampler (node "sampler") -> core VAEDecode -> SaveImage."""
    return {
        "model": {"class_type": "FluxWorksModelLoader",
                  "inputs": {"model_name": names[model], "weight_dtype": "default"}},
        **text_encoders(names, text),
        "latent": {"class_type": "EmptySD3LatentImage",
                   "inputs": {"width": width, "height": height, "batch_size": batch}},
        SAMPLER: {"class_type": "FluxWorksSampler",
                  "inputs": {"model": ["model", 0], "positive": ["encode", 0], "latent_image": ["latent", 0],
                             "seed": seed, "steps": steps, "guidance": 3.5, "shift": 0.0, "denoise": 1.0}},
        **decode_and_save(names, [SAMPLER, 0], prefix),
        LATENT_OUT: save_latent([SAMPLER, 0], prefix),
    }


def save_latent(latent: list, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": prefix}}


# --- models the examples need beyond write_models_tree -----------------------------------------------

CORE_WIDTH_NAME = "flux1-dev-corewidth-fp8.safetensors"
CANNY_NAME = "flux-controlnet-canny-tiny.safetensors"
_POOL_STEP = 509  # rows of a matrix start this many values apart in the random pool


def write_core_width_flux(path: str, seed: int = 0) -> str:
    """A FLUX.1-dev file that core's UNETLoader loads, in fp8 (390 MB): 24 heads x 128, one double block.

    Core's detection fixes 24 heads and RoPE axes (16, 56, 56) (comfy/model_detection.py), so the 2-head tiny
    model is not loadable by core. Drawing 390M normals takes ~15 s on two cores; here each matrix row is a
    window into one random pool (~1 s), scaled by 1/sqrt(fan-in) so activations stay O(1).
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True,
                                       **{**TINY_FLUX, "num_attention_heads": 24, "num_single_layers": 0})
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            rows, cols = (p.shape[0], p.shape[1]) if p.ndim == 2 else (1, p.numel())
            span = (rows - 1) * _POOL_STEP + cols
            start = int(torch.randint(0, pool.numel() - span, (1,), generator=generator))
            window = pool.as_strided((rows, cols), (_POOL_STEP, 1), start).reshape(p.shape)
            if p.ndim == 2:
                p.copy_(window * cols ** -0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.02 * window)
            else:
                p.copy_(0.02 * window)
    return write_flux(path, model, "fp8")


def _write_canny_controlnet(path: str) -> str:
    from devtools.tiny_controlnets import random_controlnet, write_controlnet

    return write_controlnet(path, random_controlnet("instantx", 0), "diffusers")


def _example_lora(kind: str):
    """Writer of one LoRA-stack example file for the server's tiny dev model (write_models_tree: seed 0), made as
    tests/e2e/test_api_lora.py makes it, so either may write it first."""

    def write(path: str) -> str:
        from devtools.tiny_loras import lora_state, lycoris_state, random_lora, random_lycoris, write_lora
        from devtools.tiny_models import random_flux

        flux = random_flux("dev", 0)
        if kind == "lokr":
            state = lycoris_state(random_lycoris(flux, "lokr", seed=34), "kohya")
        elif kind == "xlabs":
            state = lora_state(random_lora(flux, seed=33, layers="xlabs", magnitude=0.15), "xlabs")
        else:
            state = lora_state(random_lora(flux, seed=31, magnitude=0.15), "kohya")
        return write_lora(path, *state)

    return write


EXTRA_MODELS = {  # role -> (folder, file name, writer); the LoRAs keep the names the LoRA-stack example uses
    "dev_core": ("diffusion_models", CORE_WIDTH_NAME, write_core_width_flux),
    "controlnet_canny": ("controlnet", CANNY_NAME, _write_canny_controlnet),
    "example_lora": ("loras", "my_flux_lora.safetensors", _example_lora("kohya")),
    "example_lokr": ("loras", "my_style_lokr.safetensors", _example_lora("lokr")),
    "example_xlabs_lora": ("loras", "my_xlabs_lora.safetensors", _example_lora("xlabs")),
}


def add_example_models(models_dir: str, model_names: dict[str, str],
                       roles: tuple[str, ...] = tuple(EXTRA_MODELS)) -> dict[str, str]:
    """`model_names` plus the `roles` of EXTRA_MODELS it lacks, each written into `models_dir` once."""
    names = dict(model_names)
    for role in roles:
        if role in names:
            continue
        folder, file_name, write = EXTRA_MODELS[role]
        path = os.path.join(models_dir, folder, file_name)
        if not os.path.exists(path):
            write(path)
        names[role] = file_name
    return names
