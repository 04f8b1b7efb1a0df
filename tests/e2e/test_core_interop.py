"""Our nodes and ComfyUI core nodes exchange LATENT, CONDITIONING and MODEL inside one real server.

Core's FLUX.1 detection fixes 24 attention heads of width 128 (comfy/model_detection.py), so core UNETLoader
cannot load the 2-head tiny model; `core_width_model` is a 3072-wide FLUX.1 with one double block for it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.e2e.workflows import (
    DECODE,
    LATENT_OUT,
    SAMPLER,
    add_example_models,
    decode_and_save,
    save_latent,
    text_encoders,
    text_to_image,
)

pytestmark = pytest.mark.e2e

CORE_SHIFT = 1.15  # core ModelSamplingFlux default: the sigma shift mu that core's KSampler applies to FLUX.1
CORE_SEED = 103  # both core-width tests share it, so the second takes the plain KSampler run from the cache


@pytest.fixture(scope="module")
def core_width_model(comfy_server) -> str:
    return add_example_models(comfy_server.models_dir, comfy_server.model_names, ("dev_core",))["dev_core"]


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def core_sampling(names: dict[str, str], unet_name: str, seed: int, steps: int) -> dict:
    """Core UNETLoader + FluxGuidance 3.5 + ConditioningZeroOut negative around our text encode."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        **text_encoders(names),
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["encode", 0], "guidance": 3.5}},
        "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["encode", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **decode_and_save(names, ["ksampler", 0], "core"),
        "ksampler": _ksampler(["unet", 0], seed, steps),
        "core_latent": save_latent(["ksampler", 0], "core"),
    }


def _ksampler(model: list, seed: int, steps: int) -> dict:
    return {"class_type": "KSampler",
            "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                       "scheduler": "simple", "positive": ["guided", 0], "negative": ["zero", 0],
                       "latent_image": ["latent", 0], "denoise": 1.0}}


def _schedule(start: float, end: float, shape: str, cfg_scale: float = 1.0) -> dict:
    return {"class_type": "FluxWorksGuidanceSchedule",
            "inputs": {"start_value": start, "end_value": end, "shape": shape, "start_percent": 0.0,
                       "end_percent": 1.0, "cfg_scale": cfg_scale, "cfg_start_percent": 0.0,
                       "cfg_end_percent": 1.0}}


def test_core_vae_encode_feeds_our_sampler_and_core_decodes_it(comfy_server):
    names = comfy_server.model_names
    prompt = text_to_image(names, seed=101, steps=3, prefix="vae_round_trip")
    prompt["pixels"] = {"class_type": "EmptyImage",
                        "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0xC03020}}
    prompt["encoded"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["pixels", 0], "vae": ["vae", 0]}}
    prompt[SAMPLER]["inputs"].update(latent_image=["encoded", 0], denoise=0.6)
    del prompt["latent"]
    result = comfy_server.run(prompt)
    assert result.status == "success", result.messages
    [image] = comfy_server.images(result)
    assert image.size == (64, 48)
    assert _pixels(image).std() > 1.0
    assert result.progress(SAMPLER) == [1, 2, 3]


# Core CLIPTextEncodeFlux is not exercised: core's DualCLIPLoader always builds a full-size 4.7B T5-XXL.
def test_core_conditioning_nodes_feed_our_sampler(comfy_server):
    """FluxGuidance and ConditioningZeroOut (as the true-CFG negative) take and give our CONDITIONING."""
    names = comfy_server.model_names
    latents = {}
    for cfg_scale in (1.0, 2.5):
        prompt = text_to_image(names, seed=102, prefix="core_conditioning")
        prompt["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["encode", 0], "guidance": 3.5}}
        prompt["zero"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["encode", 0]}}
        prompt["schedule"] = _schedule(3.5, 3.5, "constant", cfg_scale)
        prompt[SAMPLER]["inputs"].update(positive=["guided", 0], negative=["zero", 0],
                                         guidance_schedule=["schedule", 0])
        result = comfy_server.run(prompt)
        assert result.status == "success", result.messages
        [image] = comfy_server.images(result)
        assert _pixels(image).std() > 1.0
        latents[cfg_scale] = comfy_server.latent(result, LATENT_OUT)
    # With cfg 2.5 the zeroed negative is evaluated and pushes the result away from the plain one.
    assert _rel_error(latents[2.5], latents[1.0]) > 1e-2


def test_core_ksampler_runs_our_conditioning_like_our_sampler(comfy_server, core_width_model):
    """Core UNETLoader + KSampler (euler, simple, cfg 1) on our CONDITIONING lands where FluxWorksSampler does
    on the same file, same seed, same guidance and core's sigma shift (our shift widget is e^mu)."""
    names = comfy_server.model_names
    prompt = core_sampling(names, core_width_model, seed=CORE_SEED, steps=2)
    # fp32 storage: core also widens the file's fp8 matrices and bf16 vectors to fp32 on the CPU.
    prompt["ours_model"] = {"class_type": "FluxWorksModelLoader",
                            "inputs": {"model_name": core_width_model, "weight_dtype": "fp32"}}
    prompt["ours"] = {"class_type": "FluxWorksSampler",
                      "inputs": {"model": ["ours_model", 0], "positive": ["encode", 0], "latent_image": ["latent", 0],
                                 "seed": CORE_SEED, "steps": 2, "guidance": 3.5, "shift": math.exp(CORE_SHIFT),
                                 "denoise": 1.0}}
    prompt["ours_latent"] = save_latent(["ours", 0], "ours")
    result = comfy_server.run(prompt)
    assert result.status == "success", result.messages
    [image] = comfy_server.images(result)
    assert image.size == (64, 64) and _pixels(image).std() > 1.0
    core_latent, our_latent = comfy_server.latent(result, "core_latent"), comfy_server.latent(result, "ours_latent")
    assert core_latent.shape == our_latent.shape == (1, 16, 8, 8)
    assert _rel_error(our_latent, core_latent) <= 1e-4


def test_schedule_core_model_changes_core_sampler_output(comfy_server, core_width_model):
    names = comfy_server.model_names
    prompt = core_sampling(names, core_width_model, seed=CORE_SEED, steps=2)
    for tag, curve in (("constant", _schedule(3.5, 3.5, "constant")), ("linear", _schedule(1.0, 8.0, "linear"))):
        prompt[f"{tag}_curve"] = curve
        prompt[f"{tag}_model"] = {"class_type": "FluxWorksScheduleCoreModel",
                                  "inputs": {"model": ["unet", 0], "guidance_schedule": [f"{tag}_curve", 0]}}
        prompt[f"{tag}_sampler"] = _ksampler([f"{tag}_model", 0], seed=CORE_SEED, steps=2)
        prompt[f"{tag}_latent"] = save_latent([f"{tag}_sampler", 0], tag)
    del prompt[DECODE], prompt["save"], prompt["vae"]
    result = comfy_server.run(prompt)
    assert result.status == "success", result.messages
    latents = {tag: comfy_server.latent(result, node)
               for tag, node in (("plain", "core_latent"), ("constant", "constant_latent"), ("linear", "linear_latent"))}
    # Core's FluxGuidance says 3.5, so a constant 3.5 curve must change nothing, bit for bit.
    assert torch.equal(latents["constant"], latents["plain"])
    assert _rel_error(latents["linear"], latents["plain"]) > 1e-2
