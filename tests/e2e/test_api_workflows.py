"""The pack as an HTTP API user sees it: node listing, every shipped example workflow, and the sampler's
observable behaviour (progress, batches, seeds, weight formats, img2img) through a real ComfyUI server."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.comfy_server import remove_trained_files
from tests.e2e.workflows import (
    LATENT_OUT,
    SAMPLER,
    adapt_to_tiny_models,
    add_example_models,
    api_examples,
    decode_and_save,
    input_images,
    load_api_example,
    save_image_nodes,
    save_latent,
    text_to_image,
    write_training_folder,
)
from tests.paths import comfyui_path

pytestmark = pytest.mark.e2e

MISSING = "no-api-example-workflows"
EXAMPLES = api_examples() or [MISSING]

# Public API (README node table): class_type -> required inputs in widget order, optional inputs, outputs.
DOCUMENTED = {
    "FluxWorksModelLoader": (["model_name", "weight_dtype"], [], ["FLUX_MODEL"]),
    "FluxWorksTextEncoderLoader": (["t5_name", "clip_name", "weight_dtype"], [], ["FLUX_TEXT_ENCODER"]),
    "FluxWorksTextEncode": (["text_encoder", "prompt", "clip_prompt", "max_sequence_length"], [], ["CONDITIONING"]),
    "FluxWorksGuidanceSchedule": (["start_value", "end_value", "shape", "start_percent", "end_percent", "cfg_scale",
                                   "cfg_start_percent", "cfg_end_percent"], [], ["FLUX_GUIDANCE"]),
    "FluxWorksSampler": (["model", "positive", "latent_image", "seed", "steps", "guidance", "shift", "denoise"],
                         ["negative", "guidance_schedule"], ["LATENT"]),
    "FluxWorksScheduleCoreModel": (["model", "guidance_schedule"], [], ["MODEL"]),
}
DOCUMENTED_CHOICES = {
    ("FluxWorksModelLoader", "weight_dtype"): ["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"],
    ("FluxWorksTextEncoderLoader", "weight_dtype"): ["default", "bf16", "fp16", "fp32", "fp8_e4m3fn"],
    ("FluxWorksTextEncode", "max_sequence_length"): ["512", "256", "128"],
    ("FluxWorksGuidanceSchedule", "shape"): ["constant", "linear", "cosine", "exponential", "step"],
}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _succeeded(result) -> None:
    errors = [m["data"] for m in result.messages if m["type"] == "execution_error"]
    assert result.status == "success", errors or result.messages[-3:]


@pytest.fixture(scope="module")
def example_models(comfy_server) -> dict[str, str]:
    return add_example_models(comfy_server.models_dir, comfy_server.model_names)


def test_object_info_lists_every_node_with_its_documented_inputs(comfy_server):
    info = comfy_server.get_json("/object_info")
    for node, (required, optional, outputs) in DOCUMENTED.items():
        assert node in info, f"{node} is not registered"
        entry = info[node]
        assert entry["input_order"]["required"] == required, node
        assert entry["input_order"].get("optional", []) == optional, node
        assert entry["output"] == outputs, node
        assert entry["category"] == "FluxWorks", node
    pack = info["FluxWorksSampler"]["python_module"]  # custom_nodes.<the pack's folder name>
    ours = {node: entry for node, entry in info.items() if entry["python_module"] == pack}
    assert set(DOCUMENTED) <= set(ours)
    for node, entry in ours.items():  # later issues add nodes: they follow the same conventions
        assert node.startswith("FluxWorks") and entry["category"].startswith("FluxWorks"), node
        assert entry["description"], f"{node} has no description"
    for (node, name), choices in DOCUMENTED_CHOICES.items():
        assert info[node]["input"]["required"][name][0] == choices, (node, name)
    models = info["FluxWorksModelLoader"]["input"]["required"]["model_name"][0]
    names = comfy_server.model_names
    assert {names["dev"], names["schnell"], names["dev_fp8"], names["dev_diffusers"]} <= set(models)
    encoders = info["FluxWorksTextEncoderLoader"]["input"]["required"]
    assert names["t5"] in encoders["t5_name"][0] and names["clip_l"] in encoders["clip_name"][0]  # each its kind


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_workflow_runs_over_http(comfy_server, example_models, path):
    assert path != MISSING, "example_workflows/api/ holds no API-format workflow to run"
    workflow = load_api_example(path, example_models)
    for name in input_images(workflow.prompt):  # e.g. example.png, which ships in every ComfyUI's input/
        with Image.open(os.path.join(comfyui_path(), "input", name)) as image:
            comfy_server.upload_image(image, name)
    for node in workflow.prompt.values():  # a training example's dataset folder under input/, at the tiny size
        if node["class_type"] == "FluxWorksLoraDataset" and node["inputs"].get("folder"):
            write_training_folder(os.path.join(comfy_server.input_dir, node["inputs"]["folder"]), 2)
            node["inputs"]["resolution"] = workflow.width
    result = comfy_server.run(workflow.prompt)
    try:
        _succeeded(result)
    finally:  # a trained LoRA lands in ComfyUI's own models/loras (the first loras folder)
        remove_trained_files(result.outputs, [k for k, n in workflow.prompt.items()
                                              if n["class_type"] == "FluxWorksTrainLora"])
    savers = save_image_nodes(workflow.prompt)
    assert savers, f"{workflow.name} saves no image"
    for node in savers:
        images = [comfy_server.view_image(f) for f in result.outputs[node]["images"]]
        assert len(images) == workflow.batch, node
        for image in images:
            assert image.size == (workflow.width, workflow.height)
            assert _pixels(image).std() > 1.0, "constant image"


def test_sampler_reports_progress_once_per_step(comfy_server):
    result = comfy_server.run(text_to_image(comfy_server.model_names, seed=201, steps=4))
    _succeeded(result)
    messages = [m["data"] for m in result.messages if m["type"] == "progress" and m["data"]["node"] == SAMPLER]
    assert [(m["value"], m["max"]) for m in messages] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_batch_of_two_gives_two_distinct_images(comfy_server):
    result = comfy_server.run(text_to_image(comfy_server.model_names, seed=202, batch=2, width=48, height=32))
    _succeeded(result)
    images = comfy_server.images(result)
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    latent = comfy_server.latent(result, LATENT_OUT)
    assert latent.shape == (2, 16, 4, 6)
    assert _rel_error(latent[1], latent[0]) > 0.1  # distinct noise per batch item
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))


def test_same_seed_gives_the_same_image(comfy_server):
    names = comfy_server.model_names
    # ComfyUI would serve a repeated prompt from its cache: another seed in between makes it sample again.
    first, other, again = (comfy_server.run(text_to_image(names, seed=seed)) for seed in (203, 204, 203))
    for result in (first, other, again):
        _succeeded(result)
    assert again.progress(SAMPLER), "the repeated prompt was not sampled again"
    assert torch.equal(comfy_server.latent(again, LATENT_OUT), comfy_server.latent(first, LATENT_OUT))
    assert np.array_equal(_pixels(comfy_server.images(again)[0]), _pixels(comfy_server.images(first)[0]))
    assert _rel_error(comfy_server.latent(other, LATENT_OUT), comfy_server.latent(first, LATENT_OUT)) > 0.1


@pytest.mark.parametrize("role, max_rel_error", [("dev_diffusers", 1e-5), ("dev_fp8", 0.1)])
def test_other_weight_formats_load_and_sample(comfy_server, role, max_rel_error):
    """The diffusers folder holds the same weights as the BFL file; the fp8 file those weights rounded to fp8."""
    names = comfy_server.model_names
    reference = comfy_server.run(text_to_image(names, seed=205, model="dev"))
    result = comfy_server.run(text_to_image(names, seed=205, model=role))
    _succeeded(reference)
    _succeeded(result)
    [image] = comfy_server.images(result)
    assert image.size == (64, 64) and _pixels(image).std() > 1.0
    rel = _rel_error(comfy_server.latent(result, LATENT_OUT), comfy_server.latent(reference, LATENT_OUT))
    assert rel <= max_rel_error, f"{role}: relative error {rel:.2e} against the BFL file"


def _gradient(width: int, height: int, flip: bool) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 128.0)], axis=2)
    return Image.fromarray((rgb[:, ::-1] if flip else rgb).astype(np.uint8))


def test_img2img_from_an_uploaded_image(comfy_server):
    """LoadImage -> core VAEEncode -> FluxWorksSampler at denoise 0.5: the result depends on the input image."""
    names = comfy_server.model_names
    uploads = [comfy_server.upload_image(_gradient(64, 48, flip), f"e2e_gradient_{flip}.png") for flip in (False, True)]
    prompt = text_to_image(names, seed=206, steps=2, prefix="img2img")
    del prompt["latent"], prompt[LATENT_OUT]
    for index, upload in enumerate(uploads):
        prompt[f"load_{index}"] = {"class_type": "LoadImage", "inputs": {"image": upload}}
        prompt[f"encode_{index}"] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"load_{index}", 0],
                                                                          "vae": ["vae", 0]}}
        prompt[f"sampler_{index}"] = {**prompt[SAMPLER], "inputs": {**prompt[SAMPLER]["inputs"], "denoise": 0.5,
                                                                    "latent_image": [f"encode_{index}", 0]}}
        prompt[f"latent_{index}"] = save_latent([f"sampler_{index}", 0], f"img2img_{index}")
    del prompt[SAMPLER]
    prompt.update(decode_and_save(names, ["sampler_0", 0], "img2img"))
    result = comfy_server.run(prompt)
    _succeeded(result)
    assert result.progress("sampler_0") == [1, 2]
    [image] = comfy_server.images(result)
    assert image.size == (64, 48) and _pixels(image).std() > 1.0
    assert result.progress("sampler_1") == [1, 2]
    # The random tiny VAE encodes every image to nearly the same latent, so the effect is small, but it is far
    # above float noise (same seed, same everything else).
    assert _rel_error(comfy_server.latent(result, "latent_1"), comfy_server.latent(result, "latent_0")) > 1e-4


def test_adapting_an_example_fails_loudly_on_a_model_it_cannot_stand_in_for():
    prompt = {"1": {"class_type": "FluxWorksModelLoader",
                    "inputs": {"model_name": "flux1-dev-Q4_K_S.gguf", "weight_dtype": "default"}},
              "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 2}}}
    names = {"dev": "flux1-dev-tiny.safetensors"}
    with pytest.raises(ValueError, match="flux1-dev-Q4_K_S.gguf"):
        adapt_to_tiny_models(prompt, names)
    prompt["1"]["inputs"]["model_name"] = "flux1-dev.safetensors"
    workflow = adapt_to_tiny_models(prompt, names)
    assert (workflow.width, workflow.height, workflow.batch) == (64, 48, 2)
    assert workflow.prompt["1"]["inputs"]["model_name"] == "flux1-dev-tiny.safetensors"
