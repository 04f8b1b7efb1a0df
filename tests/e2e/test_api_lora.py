"""The LoRA stack through a real ComfyUI server: any number of rows over the API, the unmatched-key report, the
wrong-architecture error, validation errors before execution, and the shipped example workflow."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from devtools.comfy_server import PromptRejected
from devtools.tiny_loras import lora_state, lycoris_state, random_lora, random_lycoris, sdxl_lora, write_lora
from devtools.tiny_models import random_flux
from tests.e2e.workflows import adapt_to_tiny_models, decode_and_save, text_encoders

pytestmark = pytest.mark.e2e

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "example_workflows", "api", "flux_dev_lora_stack.json")


@pytest.fixture(scope="module")
def loras(comfy_server) -> dict[str, str]:
    """role -> file name of tiny LoRAs for the server's tiny dev model, written into its models/loras."""
    flux = random_flux("dev", 0)  # the same architecture as the server's tiny dev model
    folder = os.path.join(comfy_server.models_dir, "loras")
    files = {
        "kohya": lora_state(random_lora(flux, seed=31, magnitude=0.15), "kohya"),
        "diffusers": lora_state(random_lora(flux, seed=32, magnitude=0.15), "diffusers"),
        "xlabs": lora_state(random_lora(flux, seed=33, layers="xlabs", magnitude=0.15), "xlabs"),
        "lokr": lycoris_state(random_lycoris(flux, "lokr", seed=34), "kohya"),
        "bfl": lora_state(random_lora(flux, seed=35, magnitude=0.15), "bfl"),
    }
    names = {}
    for role, (state, metadata) in files.items():
        names[role] = f"e2e_{role}.safetensors"
        write_lora(os.path.join(folder, names[role]), state, metadata)
    partly, metadata = lora_state(random_lora(flux, seed=36, layers="attention_mlp"), "kohya")
    for suffix, shape in ((".lora_down.weight", (4, 256)), (".lora_up.weight", (256, 4))):
        partly["lora_unet_double_blocks_12_img_attn_proj" + suffix] = torch.zeros(shape)
    write_lora(os.path.join(folder, "e2e_partly.safetensors"), partly, metadata)
    names["partly"] = "e2e_partly.safetensors"
    write_lora(os.path.join(folder, "e2e_sdxl.safetensors"), sdxl_lora())
    names["sdxl"] = "e2e_sdxl.safetensors"
    example = {"my_flux_lora.safetensors": "kohya", "my_style_lokr.safetensors": "lokr",
               "my_xlabs_lora.safetensors": "xlabs"}
    for file_name, role in example.items():
        write_lora(os.path.join(folder, file_name), *files[role])
    return names


def lora_prompt(names: dict[str, str], rows: list[dict], seed: int = 5, chained: list[dict] | None = None) -> dict:
    """Loaders -> LoRA stack (optionally fed by a second stack) -> apply (model + text encoder) -> sample."""
    prompt = {
        "model": {"class_type": "FluxWorksModelLoader",
                  "inputs": {"model_name": names["dev"], "weight_dtype": "default"}},
        **text_encoders(names),
        "stack": {"class_type": "FluxWorksLoraStack", "inputs": {"rows": json.dumps(rows)}},
        "apply": {"class_type": "FluxWorksApplyLoraStack",
                  "inputs": {"flux_model": ["model", 0], "lora_stack": ["stack", 0],
                             "text_encoder": ["text_encoder", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "FluxWorksSampler",
                    "inputs": {"model": ["apply", 0], "positive": ["encode", 0], "latent_image": ["latent", 0],
                               "seed": seed, "steps": 2, "guidance": 3.5, "shift": 0.0, "denoise": 1.0}},
        **decode_and_save(names, ["sampler", 0], "lora"),
    }
    prompt["encode"]["inputs"]["text_encoder"] = ["apply", 1]
    if chained is not None:
        prompt["first_stack"] = {"class_type": "FluxWorksLoraStack", "inputs": {"rows": json.dumps(chained)}}
        prompt["stack"]["inputs"]["lora_stack"] = ["first_stack", 0]
    return prompt


def image(comfy_server, result) -> np.ndarray:
    assert result.status == "success", result.messages
    [img] = comfy_server.images(result)
    return np.asarray(img, dtype=np.float32)


def test_nodes_declare_their_inputs_in_a_stable_order(comfy_server):
    info = comfy_server.get_json("/object_info")
    stack, apply = info["FluxWorksLoraStack"], info["FluxWorksApplyLoraStack"]
    assert stack["input_order"] == {"required": ["rows"], "optional": ["lora_stack"]}
    assert stack["output"] == ["LORA_STACK"]
    assert apply["input_order"] == {"required": ["flux_model", "lora_stack"],
                                    "optional": ["text_encoder", "switch_vram"]}
    assert apply["output"] == ["FLUX_MODEL", "FLUX_TEXT_ENCODER", "STRING"]
    assert apply["output_name"] == ["flux_model", "text_encoder", "applied_loras"]


def test_five_rows_over_the_api_with_a_chained_stack_and_the_unmatched_report(comfy_server, loras):
    names = {**comfy_server.model_names}
    rows = [{"lora": loras["kohya"], "strength": 0.8}, {"lora": loras["diffusers"], "strength": -0.5},
            {"lora": loras["xlabs"], "strength": 1.0, "enabled": False}, {"lora": loras["lokr"], "strength": 0.7},
            {"lora": loras["partly"], "strength": 0.5, "text_strength": 0.0}]
    chained = [{"lora": loras["bfl"], "strength": 0.3}]
    with_loras = comfy_server.run(lora_prompt(names, rows, chained=chained))
    lora_image = image(comfy_server, with_loras)
    [report] = with_loras.outputs["apply"]["text"]
    lines = report.splitlines()
    assert [line.split(" @ ")[0] for line in lines] == [loras["bfl"], loras["kohya"], loras["diffusers"], loras["lokr"],
                                                       loras["partly"]]
    assert "kohya LoKr" in lines[3]
    assert ("2 keys not applied: lora_unet_double_blocks_12_img_attn_proj.lora_down.weight (no FLUX.1 layer of this "
            "name), lora_unet_double_blocks_12_img_attn_proj.lora_up.weight") in lines[4]

    disabled = [dict(row, enabled=False) for row in rows]
    plain = image(comfy_server, comfy_server.run(lora_prompt(names, disabled)))
    without_stack = lora_prompt(names, [])
    without_stack["sampler"]["inputs"]["model"] = ["model", 0]
    without_stack["encode"]["inputs"]["text_encoder"] = ["text_encoder", 0]
    for node in ("stack", "apply"):
        del without_stack[node]
    base = image(comfy_server, comfy_server.run(without_stack))
    assert np.array_equal(plain, base), "a stack with every row disabled must give exactly the base image"
    assert np.abs(lora_image - base).mean() > 2.0, "the LoRAs should visibly change the image"


def test_wrong_architecture_fails_with_the_reason(comfy_server, loras):
    result = comfy_server.run(lora_prompt(comfy_server.model_names, [{"lora": loras["sdxl"], "strength": 1.0}]))
    assert result.status == "error"
    error = result.error()
    assert error["node_id"] == "apply"
    assert loras["sdxl"] in error["exception_message"] and "SDXL" in error["exception_message"]
    assert comfy_server.alive()


@pytest.mark.parametrize(("rows", "message"), [
    ("[{", "not valid JSON"),
    (json.dumps([{"lora": "missing.safetensors"}]), "not found in models/loras: missing.safetensors"),
    (json.dumps([{"lora": "e2e_kohya.safetensors", "weight": 1}]), "unknown keys ['weight']"),
])
def test_bad_rows_are_rejected_before_anything_runs(comfy_server, loras, rows, message):
    prompt = lora_prompt(comfy_server.model_names, [])
    prompt["stack"]["inputs"]["rows"] = rows
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(prompt, "bad-rows")
    assert message in json.dumps(rejected.value.body)


def test_the_example_workflow_runs_with_its_lora_stack(comfy_server, loras):
    with open(EXAMPLE, encoding="utf-8") as f:
        workflow = adapt_to_tiny_models(json.load(f), comfy_server.model_names, "flux_dev_lora_stack")
    result = comfy_server.run(workflow.prompt)
    assert image(comfy_server, result).shape[:2] == (workflow.height, workflow.width)
    [report] = result.outputs["4"]["text"]
    assert [line.split(" @ ")[0] for line in report.splitlines()] == ["my_flux_lora.safetensors",
                                                                     "my_style_lokr.safetensors"]
