"""ControlNets through a real ComfyUI server: the shipped example, every format chained with a mask, depth maps,
BFL's structural models, control images of another size, and clear errors for wrong inputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from devtools.tiny_controlnets import write_controlnets_tree, write_depth_model
from tests.e2e.ui_workflows import load_api, load_ui, ui_to_api
from tests.e2e.workflows import adapt_to_tiny_models, decode_and_save, text_encoders
from tests.paths import comfyui_path

pytestmark = pytest.mark.e2e

EXAMPLE = "flux_dev_controlnet_canny"
WRONG_FILE = "not-a-controlnet.safetensors"
DEPTH_MODEL = "depth-anything-tiny"


@pytest.fixture(scope="module")
def names(comfy_server) -> dict[str, str]:
    """The tiny ControlNets, a structural model, a depth model and a wrong file in the server's models tree."""
    names = {**comfy_server.model_names, **write_controlnets_tree(comfy_server.models_dir)}
    models = comfy_server.models_dir
    shutil.copyfile(os.path.join(models, "diffusion_models", names["dev"]), os.path.join(models, "controlnet", WRONG_FILE))
    write_depth_model(os.path.join(models, "depth", DEPTH_MODEL))  # models/depth beside models/controlnet
    shutil.copyfile(os.path.join(comfyui_path(), "input", "example.png"), os.path.join(comfy_server.input_dir, "example.png"))
    return names


def save_input(comfy_server, array: np.ndarray, name: str) -> str:
    Image.fromarray(array).save(os.path.join(comfy_server.input_dir, name))
    return name


def run_ok(comfy_server, prompt: dict):
    result = comfy_server.run(prompt)
    assert result.status == "success", result.error() if result.status == "error" else result.status
    return result


def saved(comfy_server, result, node: str = "save") -> np.ndarray:
    """The image a SaveImage / PreviewImage node produced, as int16 pixels."""
    [image] = result.outputs[node]["images"]
    return np.asarray(comfy_server.view_image(image)).astype(np.int16)


def example_prompt(names: dict[str, str], **apply_inputs) -> dict:
    """The shipped API example on the tiny models (1/16 size, few steps; `names` has the tiny canny ControlNet)."""
    prompt = load_api(EXAMPLE)
    [apply] = [n for n in prompt.values() if n["class_type"] == "FluxWorksControlNetApply"]
    apply["inputs"].update(apply_inputs)
    return adapt_to_tiny_models(prompt, names, EXAMPLE).prompt


def controlled(names: dict[str, str], controls: list[dict], *, model: str = "dev", extra: dict | None = None,
               prefix: str = "cn") -> dict:
    """text encode -> FluxWorksControlNetApply per entry of `controls` (chained) -> sampler (64 x 64, 2 steps)."""
    prompt = {
        **text_encoders(names),
        "model": {"class_type": "FluxWorksModelLoader", "inputs": {"model_name": names[model], "weight_dtype": "default"}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **decode_and_save(names, ["sampler", 0], prefix),
        **(extra or {}),
    }
    conditioning = ["encode", 0]
    for i, control in enumerate(controls):
        role, image, options = control["role"], control["image"], control.get("inputs", {})
        prompt[f"cn_loader{i}"] = {"class_type": "FluxWorksControlNetLoader",
                                   "inputs": {"control_net_name": names.get(role, role), "weight_dtype": "default"}}
        inputs = {"conditioning": conditioning, "control_net": [f"cn_loader{i}", 0], "image": image, "strength": 0.8,
                  "start_percent": 0.0, "end_percent": 1.0, "union_mode": "none", "vae": ["vae", 0], **options}
        prompt[f"apply{i}"] = {"class_type": "FluxWorksControlNetApply", "inputs": inputs}
        conditioning = [f"apply{i}", 0]
    prompt["sampler"] = {"class_type": "FluxWorksSampler", "inputs": {
        "model": ["model", 0], "positive": conditioning, "latent_image": ["latent", 0], "seed": 5, "steps": 2,
        "guidance": 3.5, "shift": 0.0, "denoise": 1.0}}
    return prompt


def test_nodes_and_model_lists_are_registered(comfy_server, names):
    info = comfy_server.get_json("/object_info")
    listed = info["FluxWorksControlNetLoader"]["input"]["required"]["control_net_name"][0]
    assert {names["controlnet_canny"], names["controlnet_folder"], names["controlnet_mistoline"]} <= set(listed)
    assert not any(n.startswith(names["controlnet_folder"] + "/") for n in listed)  # the folder, not its files
    assert info["FluxWorksDepthEstimate"]["input"]["required"]["model_name"][0] == [DEPTH_MODEL]
    assert info["FluxWorksControlNetApply"]["input"]["required"]["union_mode"][0] == [
        "none", "canny", "tile", "depth", "blur", "pose", "gray", "lq"]
    assert ui_to_api(load_ui(EXAMPLE), info) == load_api(EXAMPLE)  # the UI example is its API copy


def test_the_example_workflow_runs_and_the_control_shapes_the_image(comfy_server, names):
    result = run_ok(comfy_server, example_prompt(names))
    edges, image = saved(comfy_server, result, "7"), saved(comfy_server, result, "13")  # Canny preview, output
    assert edges.shape == (768, 768, 3) and 0.001 < (edges > 127).mean() < 0.2  # edges at the input's size
    assert image.shape == (64, 64, 3) and image.std() > 1.0
    zero = saved(comfy_server, run_ok(comfy_server, example_prompt(names, strength=0.0)), "13")
    assert not np.array_equal(image, zero)  # the control reaches the image ...
    bypassed = example_prompt(names)
    bypassed["11"]["inputs"]["positive"] = ["8", 0]  # sampler fed the prompt alone
    assert np.array_equal(zero, saved(comfy_server, run_ok(comfy_server, bypassed), "13"))  # ... and strength 0 is none


def test_every_format_chains_with_a_mask_a_union_mode_and_a_depth_map(comfy_server, names):
    extra = {
        "photo": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "depth": {"class_type": "FluxWorksDepthEstimate", "inputs": {"image": ["photo", 0], "model_name": DEPTH_MODEL}},
        "left": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 48, "height": 40}},
        "preview": {"class_type": "SaveImage", "inputs": {"images": ["depth", 0], "filename_prefix": "depth"}},
    }
    controls = [
        {"role": "controlnet_canny", "image": ["photo", 0], "inputs": {"mask": ["left", 0], "end_percent": 0.5}},
        {"role": "controlnet_union", "image": ["depth", 0], "inputs": {"union_mode": "depth"}},
        {"role": "controlnet_folder", "image": ["depth", 0]},
        {"role": "controlnet_xlabs", "image": ["photo", 0], "inputs": {"start_percent": 0.5}},
        {"role": "controlnet_mistoline", "image": ["photo", 0]},
    ]
    result = run_ok(comfy_server, controlled(names, controls, extra=extra))
    depth = saved(comfy_server, result, "preview")
    assert depth.shape == (768, 768, 3) and depth.min() == 0 and depth.max() == 255
    assert saved(comfy_server, result).shape == (64, 64, 3)


def test_a_control_image_of_another_size_is_center_cropped_and_resized(comfy_server, names):
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    double = exact.repeat(2, axis=0).repeat(2, axis=1)  # area averaging brings it back exactly
    wide = np.concatenate([rng.integers(0, 256, (128, 30, 3), dtype=np.uint8), double,
                           rng.integers(0, 256, (128, 30, 3), dtype=np.uint8)], axis=1)  # 128 x 188: sides cropped
    images = {}
    for name, array in (("exact", exact), ("wide", wide)):
        load = {"load": {"class_type": "LoadImage", "inputs": {"image": save_input(comfy_server, array, f"{name}.png")}}}
        prompt = controlled(names, [{"role": "controlnet_canny", "image": ["load", 0]}], extra=load, prefix=name)
        images[name] = saved(comfy_server, run_ok(comfy_server, prompt))
    assert np.array_equal(images["exact"], images["wide"])


def test_a_wrong_file_in_the_loader_says_what_was_expected(comfy_server, names):
    load = {"load": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    result = comfy_server.run(controlled(names, [{"role": WRONG_FILE, "image": ["load", 0]}], extra=load))
    assert result.status == "error"
    error = result.error()
    assert error["node_type"] == "FluxWorksControlNetLoader"
    message = error["exception_message"]
    assert f"{WRONG_FILE} is not a Flux ControlNet" in message
    assert "controlnet_x_embedder.weight" in message and "FluxWorksModelLoader" in message


def test_a_latent_input_controlnet_without_a_vae_is_refused(comfy_server, names):
    load = {"load": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    prompt = controlled(names, [{"role": "controlnet_canny", "image": ["load", 0]}], extra=load)
    del prompt["apply0"]["inputs"]["vae"]
    error = comfy_server.run(prompt).error()
    assert "connect the FLUX.1 VAE" in error["exception_message"]


def test_canny_dev_style_models_take_their_control_image_through_the_structural_node(comfy_server, names):
    extra = {
        "load": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "edges": {"class_type": "FluxWorksCannyEdges", "inputs": {"image": ["load", 0], "low_threshold": 0.1,
                                                                  "high_threshold": 0.2, "blur_sigma": 1.0}},
        "structural": {"class_type": "FluxWorksStructuralControl",
                       "inputs": {"conditioning": ["encode", 0], "vae": ["vae", 0], "image": ["edges", 0]}},
    }
    prompt = controlled(names, [], model="structural", extra=extra)
    prompt["sampler"]["inputs"]["positive"] = ["structural", 0]
    assert saved(comfy_server, run_ok(comfy_server, prompt)).shape == (64, 64, 3)
    prompt["sampler"]["inputs"]["positive"] = ["encode", 0]
    assert "connect FluxWorksStructuralControl" in comfy_server.run(prompt).error()["exception_message"]
