"""Our loader + ControlStack + sampler against diffusers' FluxControlNetPipeline / FluxControlPipeline on the
same tiny random fp32 weights: final latents agree to rel. err <= 1e-4.

Both sides get the same noise (diffusers through `latents=`) and the same control input. diffusers' pipelines
take the control image as a tensor (used as given, so we pass it in [-1, 1]) and VAE-encode it themselves for
latent-input ControlNets; the tiny VAE of conftest.py has a near-deterministic posterior, and our side feeds
that VAE's posterior mean, so both see the same control latent.
"""

from __future__ import annotations

import os

import pytest
import torch

from devtools.tiny_controlnets import random_controlnet, random_structural_flux, write_controlnet
from fluxworks.flux_controlnet import UNION_MODES, ControlStack, ControlUnit, load_controlnet, pixel_cond
from fluxworks.flux_sampler.latents import pack, unpack
from tests.controlnet.conftest import (
    GUIDANCE,
    HEIGHT,
    STEPS,
    WIDTH,
    control_image,
    control_latent_tokens,
    sample,
)
from tests.parity.conftest import flux_scheduler, rel_err

TOL = 1e-6  # about 3x the largest measured error (1.2e-7 InstantX, 0 XLabs; see tests/test_mutations.py)


def controlnet_pipeline(transformer, controlnet, vae):
    from diffusers import FluxControlNetPipeline

    pipe = FluxControlNetPipeline(scheduler=flux_scheduler("dev"), vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                  controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, prompt, noise, images, **kwargs) -> torch.Tensor:
    """images: IMAGE tensors in [0, 1] (one, or a list for several controls); diffusers gets them in [-1, 1]."""
    control = [pixel_cond(i) for i in images] if isinstance(images, list) else pixel_cond(images)
    return pipe(prompt_embeds=prompt.embeds, pooled_prompt_embeds=prompt.pooled, control_image=control,
                height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=pack(noise), output_type="latent", **kwargs).images


def loaded(tmp_path, model, fmt: str):
    """Write `model` in `fmt` and load it back through our loader (format detection + conversion)."""
    name = "net" if fmt == "diffusers_folder" else f"net-{fmt}.safetensors"
    return load_controlnet(write_controlnet(os.path.join(tmp_path, name), model, fmt), "default", torch.float32)


def unit_for(net, vae, image, **kwargs) -> ControlUnit:
    cond = control_latent_tokens(vae, image) if net.config.latent_input else pixel_cond(image)
    return ControlUnit(net, cond, **kwargs)


@pytest.mark.parametrize("kind,fmt", [("instantx", "diffusers"), ("instantx", "diffusers_folder"), ("xlabs", "xlabs")])
def test_one_controlnet_equals_flux_controlnet_pipeline(tmp_path, transformer, prompt, noise, vae, uncontrolled, kind,
                                                        fmt):
    reference = random_controlnet(kind, 21, num_layers=2, num_single_layers=0 if kind == "xlabs" else 2)
    image = control_image(1)
    expected = run_pipeline(controlnet_pipeline(transformer, reference, vae), prompt, noise, image,
                            controlnet_conditioning_scale=0.8)
    net = loaded(tmp_path, reference, fmt)
    stack = ControlStack([unit_for(net, vae, image, strength=0.8)], transformer.config)
    ours = sample(transformer, prompt, noise, stack)
    assert rel_err(ours, expected) <= TOL
    assert stack.evaluations == STEPS
    assert rel_err(ours, uncontrolled) > 1e-3  # the control changes the result


def test_two_controlnets_equal_flux_multi_controlnet_model(tmp_path, transformer, prompt, noise, vae):
    from diffusers import FluxMultiControlNetModel

    first, second = (random_controlnet("instantx", s, num_layers=2, num_single_layers=2) for s in (31, 32))
    images = [control_image(2), control_image(3)]
    pipe = controlnet_pipeline(transformer, FluxMultiControlNetModel([first, second]), vae)
    expected = run_pipeline(pipe, prompt, noise, images, controlnet_conditioning_scale=[0.7, 0.5])
    units = [unit_for(loaded(tmp_path, m, "diffusers"), vae, i, strength=s)
             for m, i, s in zip((first, second), images, (0.7, 0.5), strict=True)]
    ours = sample(transformer, prompt, noise, ControlStack(units, transformer.config))
    assert rel_err(ours, expected) <= TOL
    only_first = sample(transformer, prompt, noise, ControlStack(units[:1], transformer.config))
    assert rel_err(ours, only_first) > 1e-3


def test_union_mode_equals_diffusers_control_mode(tmp_path, transformer, prompt, noise, vae):
    reference = random_controlnet("union", 41, num_layers=2, num_single_layers=0)
    net = loaded(tmp_path, reference, "diffusers")
    assert net.config.num_mode == 10
    image = control_image(4)
    depth = UNION_MODES.index("depth")
    assert depth == 2
    expected = run_pipeline(controlnet_pipeline(transformer, reference, vae), prompt, noise, image, control_mode=depth)
    ours = sample(transformer, prompt, noise, ControlStack([unit_for(net, vae, image, mode=depth)], transformer.config))
    assert rel_err(ours, expected) <= TOL
    canny = sample(transformer, prompt, noise, ControlStack([unit_for(net, vae, image, mode=0)], transformer.config))
    assert rel_err(canny, expected) > 1e-4  # the mode matters


def test_start_end_percent_equal_control_guidance_start_end(tmp_path, transformer, prompt, noise, vae):
    reference = random_controlnet("instantx", 51, num_layers=2, num_single_layers=2)
    net = loaded(tmp_path, reference, "diffusers")
    image = control_image(5)
    pipe = controlnet_pipeline(transformer, reference, vae)
    expected = run_pipeline(pipe, prompt, noise, image, control_guidance_start=0.3, control_guidance_end=0.7)
    stack = ControlStack([unit_for(net, vae, image, start=0.3, end=0.7)], transformer.config)
    ours = sample(transformer, prompt, noise, stack)
    assert rel_err(ours, expected) <= TOL
    assert stack.evaluations == 1  # only step 1 of 3; the ControlNet is not evaluated outside its window
    always = sample(transformer, prompt, noise, ControlStack([unit_for(net, vae, image)], transformer.config))
    assert rel_err(ours, always) > 1e-3


def test_structural_concat_equals_flux_control_pipeline(transformer, prompt, noise, vae):
    """FLUX.1-Canny/Depth-dev style: the control latent is concatenated to the image tokens (128 channels).
    FluxControlPipeline takes already packed latents (3-D) as given, so both sides get the same tokens."""
    from diffusers import FluxControlPipeline

    structural = random_structural_flux(61)
    tokens = control_latent_tokens(vae, control_image(6))
    pipe = FluxControlPipeline(scheduler=flux_scheduler("dev"), vae=vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=structural)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=prompt.embeds, pooled_prompt_embeds=prompt.pooled, control_image=tokens,
                    height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=pack(noise), output_type="latent").images
    concat = unpack(tokens, HEIGHT // 8, WIDTH // 8)
    ours = sample(structural, prompt, noise, concat_latent=concat)
    assert rel_err(ours, expected) <= TOL
    other = sample(structural, prompt, noise, concat_latent=unpack(control_latent_tokens(vae, control_image(7)), 16, 16))
    assert rel_err(ours, other) > 1e-3
