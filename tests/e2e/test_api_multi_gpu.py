"""FluxWorks Multi-GPU through a real ComfyUI server, on the CPU: two gloo worker processes ("cpu,cpu") stand in for
two GPUs. The same graph with and without the node gives the same latent (split image and spread batch), a LoRA
change reaches the workers, bad settings give clear errors, and the server keeps serving."""

from __future__ import annotations

import json
import os

import pytest
import torch

from devtools.tiny_loras import lora_state, random_lora, write_lora
from devtools.tiny_models import random_flux
from tests.e2e.workflows import LATENT_OUT, SAMPLER, text_to_image

pytestmark = pytest.mark.e2e

# Measured through the server: split image 2.7e-7 (Ulysses all-to-all changes the summation order), spread batch 0.
TOLERANCE = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def with_multi_gpu(prompt: dict, mode: str, devices: str = "cpu,cpu") -> dict:
    prompt = json.loads(json.dumps(prompt))
    prompt["multi_gpu"] = {"class_type": "FluxWorksMultiGPU",
                           "inputs": {"model": prompt[SAMPLER]["inputs"]["model"], "devices": devices, "mode": mode}}
    prompt[SAMPLER]["inputs"]["model"] = ["multi_gpu", 0]
    return prompt


def with_lora(prompt: dict, lora: str) -> dict:
    prompt = json.loads(json.dumps(prompt))
    prompt["stack"] = {"class_type": "FluxWorksLoraStack",
                       "inputs": {"rows": json.dumps([{"lora": lora, "strength": 0.9}])}}
    prompt["apply"] = {"class_type": "FluxWorksApplyLoraStack",
                       "inputs": {"flux_model": ["model", 0], "lora_stack": ["stack", 0]}}
    prompt[SAMPLER]["inputs"]["model"] = ["apply", 0]
    return prompt


def latent(server, prompt: dict) -> torch.Tensor:
    result = server.run(prompt, timeout=600)
    assert result.status == "success", result.messages
    return server.latent(result, LATENT_OUT)


@pytest.fixture(scope="module")
def lora(comfy_server) -> str:
    state, metadata = lora_state(random_lora(random_flux("dev", 0), seed=41, magnitude=0.15), "kohya")
    name = "e2e_multi_gpu_lora.safetensors"
    write_lora(os.path.join(comfy_server.models_dir, "loras", name), state, metadata)
    return name


@pytest.mark.parametrize("mode, batch", [("split image", 1), ("spread batch", 3)])
def test_workers_give_the_one_process_latent(comfy_server, mode, batch):
    names = comfy_server.model_names
    plain = text_to_image(names, seed=301, batch=batch, prefix=f"mgpu_{batch}")
    reference = latent(comfy_server, plain)
    assert rel(latent(comfy_server, with_multi_gpu(plain, mode)), reference) <= TOLERANCE


def test_a_lora_change_reaches_the_workers(comfy_server, lora):
    names = comfy_server.model_names
    plain = text_to_image(names, seed=302, prefix="mgpu_lora")
    base = latent(comfy_server, with_multi_gpu(plain, "split image"))
    reference = latent(comfy_server, with_lora(plain, lora))
    patched = latent(comfy_server, with_multi_gpu(with_lora(plain, lora), "split image"))
    assert rel(patched, reference) <= TOLERANCE and rel(patched, base) > 1e-3
    again = latent(comfy_server, with_multi_gpu(plain, "split image"))  # the LoRA's weights go back
    assert rel(again, base) <= TOLERANCE


def test_bad_settings_give_clear_errors_and_the_server_keeps_serving(comfy_server):
    names = comfy_server.model_names
    plain = text_to_image(names, seed=303, prefix="mgpu_bad")
    result = comfy_server.run(with_multi_gpu(plain, "split image", devices="cpu"))
    assert result.status == "error"
    assert "needs at least 2 devices" in result.error()["exception_message"]
    odd = text_to_image(names, seed=303, width=48, height=48, prefix="mgpu_odd")  # 3x3 image tokens
    result = comfy_server.run(with_multi_gpu(odd, "split image"))
    assert result.status == "error"
    message = result.error()["exception_message"]
    assert "9 image tokens" in message and "spread batch" in message
    assert comfy_server.run(with_multi_gpu(odd, "spread batch")).status == "success"
