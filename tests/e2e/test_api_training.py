"""LoRA training through a real ComfyUI server (embedded model only, CPU): a dataset folder under input/ ->
FluxWorks LoRA Dataset -> FluxWorks Train LoRA (a few steps, a validation preview) -> its LORA_STACK straight into
FluxWorks Apply LoRA Stack -> FluxWorks Sampler -> a picture; the file lands in models/loras. A bad dataset is an
execution error naming the fix, and the server stays up. The test removes the file it trained, which
lands in ComfyUI's own models/loras (the first loras folder)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from devtools.comfy_server import remove_trained_files
from tests.e2e.workflows import write_training_folder

pytestmark = pytest.mark.e2e

MODEL, T5, CLIP = "flux1-shapes-tiny.safetensors", "t5xxl_shapes_tiny.safetensors", "clip_l_shapes_tiny.safetensors"
VAE = "taef1_shapes_tiny.safetensors"


def training_prompt(folder: str, lora_name: str, steps: int = 3) -> dict:
    return {
        "model": {"class_type": "FluxWorksModelLoader", "inputs": {"model_name": MODEL, "weight_dtype": "default"}},
        "te": {"class_type": "FluxWorksTextEncoderLoader",
               "inputs": {"t5_name": T5, "clip_name": CLIP, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "data": {"class_type": "FluxWorksLoraDataset",
                 "inputs": {"text_encoder": ["te", 0], "vae": ["vae", 0], "folder": folder, "instance_prompt": "",
                            "resolution": 128, "caption_dropout": 0.0, "max_sequence_length": "128"}},
        "check": {"class_type": "FluxWorksTextEncode",
                  "inputs": {"text_encoder": ["te", 0], "prompt": "a large red ciel in the center, on a blue "
                             "background", "clip_prompt": "", "max_sequence_length": "128"}},
        "train": {"class_type": "FluxWorksTrainLora",
                  "inputs": {"flux_model": ["model", 0], "dataset": ["data", 0], "lora_name": lora_name,
                             "steps": steps, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "lr_schedule": "constant",
                             "lr_warmup_steps": 0, "optimizer": "adamw", "batch_size": 2, "gradient_accumulation": 1,
                             "gradient_checkpointing": False, "fp8_base": False, "timestep_sampling": "flux_shift",
                             "guidance": 2.0, "lora_layers": "attention_mlp", "seed": 0, "save_every": 0,
                             "resume_lora": "none", "validation_prompt": ["check", 0], "validation_vae": ["vae", 0],
                             "validate_every": 2, "validation_steps": 4, "validation_guidance": 2.0}},
        "apply": {"class_type": "FluxWorksApplyLoraStack",
                  "inputs": {"flux_model": ["model", 0], "lora_stack": ["train", 0], "switch_vram": 0.1}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sample": {"class_type": "FluxWorksSampler",
                   "inputs": {"model": ["apply", 0], "positive": ["check", 0], "latent_image": ["latent", 0],
                              "seed": 1, "steps": 4, "guidance": 2.0, "shift": 0, "denoise": 1}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "e2e_trained"}},
        "curve": {"class_type": "PreviewImage", "inputs": {"images": ["train", 1]}},
    }


def test_dataset_train_and_sample_with_the_lora_stack(embedded_server):
    write_training_folder(os.path.join(embedded_server.input_dir, "e2e_hearts"), 4, "heart")
    result = embedded_server.run(training_prompt("e2e_hearts", "e2e_trained"), timeout=600)
    errors = [(m["data"]["exception_message"], m["data"]["traceback"][-3:]) for m in result.messages
              if m["type"] == "execution_error"]
    assert result.status == "success", errors
    text = result.outputs["train"]["text"][0]
    assert text.startswith("saved ") and " after 3 steps" in text
    path = text.removeprefix("saved ").split(" after ")[0]
    try:  # the first loras folder: ComfyUI's own models/loras (the server's extra model paths come after it)
        assert os.path.basename(path) == "e2e_trained.safetensors" and os.path.basename(os.path.dirname(path)) == "loras"
        assert os.path.isfile(path) and os.path.isfile(path.replace(".safetensors", ".state.safetensors"))
        assert result.outputs["train"]["lora_files"] == [path, path.replace(".safetensors", ".state.safetensors")]
    finally:
        remove_trained_files(result.outputs, ["train"])
    [picture] = [embedded_server.view_image(f) for f in result.outputs["save"]["images"]]
    assert picture.size == (128, 128)
    [curve] = [embedded_server.view_image(f) for f in result.outputs["curve"]["images"]]
    assert curve.size == (512, 256) and np.asarray(curve.convert("L")).std() > 5
    assert any(m["type"] == "binary_preview" for m in result.messages)  # the validation preview and loss text
    progress = [m["data"] for m in result.messages if m["type"] == "progress" and m["data"].get("node") == "train"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 3


def test_a_picture_without_caption_is_an_error_naming_the_fix(embedded_server):
    folder = os.path.join(embedded_server.input_dir, "e2e_uncaptioned")
    write_training_folder(folder, 2, "heart")
    os.remove(os.path.join(folder, "heart_1.txt"))
    result = embedded_server.run(training_prompt("e2e_uncaptioned", "e2e_never"), timeout=300)
    assert result.status == "error"
    [error] = [m["data"] for m in result.messages if m["type"] == "execution_error"]
    assert error["node_type"] == "FluxWorksLoraDataset"
    assert "heart_1.png" in error["exception_message"] and "set instance_prompt" in error["exception_message"]
    assert "e2e_never" not in embedded_server.log()
    assert embedded_server.alive()
