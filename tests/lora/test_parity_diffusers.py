"""Our LoRA stack against diffusers' reference: `FluxPipeline.load_lora_weights` + `set_adapters` (PEFT LoRA
layers at run time) on the same tiny random FLUX.1-dev, same noise and schedule: final latents must agree."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from devtools.tiny_loras import lora_state, random_lora, write_lora
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_sampler.latents import pack as pack_latent
from tests.lora.lora_helpers import LATENT_SHAPE, conditioning, make_patcher, relative_error, sample_patcher

STEPS = 3
TOLERANCE = 1e-6  # about 3x the measured error (2.1e-7)


def diffusers_latent(flux, lora_dir: str, loras: list[tuple[str, float]]) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(flux))
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (file, _) in enumerate(loras):
        pipe.load_lora_weights(lora_dir, weight_name=file, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    if names:
        pipe.set_adapters(names, [strength for _, strength in loras])
    cond = conditioning()
    noise = make_noise(LATENT_SHAPE, 0)
    out = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, height=64, width=64,
               num_inference_steps=STEPS, guidance_scale=3.5, latents=pack_latent(noise),
               output_type="latent").images
    return out


def ours_latent(pack, flux, loras: list[tuple[str, float]]) -> torch.Tensor:
    node = pack.nodes.lora.FluxWorksApplyLoraStack()
    model, _, _ = node.apply(make_patcher(pack, flux), [(f, s, s) for f, s in loras])["result"]
    return pack_latent(sample_patcher(pack, model, STEPS))


@pytest.fixture(scope="module")
def lora_files(pack, flux):
    """Three diffusers-format LoRAs (train_dreambooth_lora_flux layout; one stores lora_alpha != r in the
    safetensors metadata, as diffusers' save_lora_weights does)."""
    files = []
    for seed, fmt in ((11, "diffusers"), (12, "diffusers_metadata"), (13, "diffusers")):
        state, metadata = lora_state(random_lora(flux, rank=4, alpha=6.0, seed=seed, layers="all"), fmt)
        name = f"parity_{seed}.safetensors"
        write_lora(os.path.join(pack.loras_dir, name), state, metadata)
        files.append(name)
    return files


def test_without_loras_the_two_samplers_agree(pack, flux, lora_files):
    assert relative_error(ours_latent(pack, flux, []), diffusers_latent(flux, pack.loras_dir, [])) < 1e-5


@pytest.mark.parametrize("strengths", [(0.8,), (1.0, -0.5, 1.3)], ids=["one", "three"])
def test_final_latent_matches_diffusers_set_adapters(pack, flux, lora_files, strengths):
    loras = list(zip(lora_files, strengths, strict=False))
    ours = ours_latent(pack, flux, loras)
    reference = diffusers_latent(flux, pack.loras_dir, loras)
    base = diffusers_latent(flux, pack.loras_dir, [])
    assert relative_error(reference, base) > 0.02, "the LoRAs should change the image noticeably"
    assert relative_error(ours, reference) <= TOLERANCE
