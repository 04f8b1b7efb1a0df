"""Tiny models shared by the ControlNet tests: a FLUX.1-dev transformer deep enough (3 double + 4 single
blocks) that residuals of 2-block ControlNets must be spread or repeated, a tiny diffusers VAE, and a prompt."""

from __future__ import annotations

import pytest
import torch

from devtools.tiny_models import random_flux
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, calculate_mu, get_sigmas
from fluxworks.flux_sampler.latents import LATENT_SCALE, LATENT_SHIFT, make_noise, pack
from tests.node_path import sample_node_path

HEIGHT = WIDTH = 128  # pixels: a 16 x 16 latent, 64 tokens
LATENT_SHAPE = (1, 16, HEIGHT // 8, WIDTH // 8)
STEPS, GUIDANCE, SEED = 3, 3.5, 7


@pytest.fixture(scope="session")
def transformer():
    return random_flux("dev", 3, num_layers=3, num_single_layers=4)


@pytest.fixture(scope="session")
def prompt() -> TextConditioning:
    torch.manual_seed(11)
    return TextConditioning(torch.randn(1, 12, 64), torch.randn(1, 64))


@pytest.fixture(scope="session")
def noise() -> torch.Tensor:
    return make_noise(LATENT_SHAPE, SEED)


@pytest.fixture(scope="session")
def vae():
    """A tiny diffusers AutoencoderKL (8x downsampling, 16 latent channels, FLUX.1 scale and shift) whose
    posterior has negligible variance: diffusers' pipelines *sample* it when they encode a control image,
    so a near-zero variance (logvar clamped at -30, std 3e-7) makes their encoding equal the posterior mean,
    which is what our side feeds in."""
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8],
                          layers_per_block=1, norm_num_groups=4, scaling_factor=LATENT_SCALE,
                          shift_factor=LATENT_SHIFT, use_quant_conv=False, use_post_quant_conv=False).eval()
    with torch.no_grad():
        conv_out = model.encoder.conv_out
        conv_out.weight[16:].zero_()
        conv_out.bias[16:].fill_(-100.0)
    return model


@pytest.fixture(scope="session")
def uncontrolled(transformer, prompt, noise) -> torch.Tensor:
    """The final latent without any control, to show that a control changes it."""
    return sample(transformer, prompt, noise)


def control_image(seed: int) -> torch.Tensor:
    """A ComfyUI IMAGE (1, H, W, 3) in [0, 1] with some structure."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear").movedim(1, -1)


def control_latent_tokens(vae, image: torch.Tensor) -> torch.Tensor:
    """The packed model-space control latent (1, L, 64) of an IMAGE, as our nodes prepare it."""
    with torch.no_grad():
        mean = vae.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mean
    return pack((mean - LATENT_SHIFT) * LATENT_SCALE)


def sample(transformer, prompt, noise, controls=None, concat_latent=None, steps: int = STEPS) -> torch.Tensor:
    """Our sampler from pure noise; returns the packed model-space latent, as diffusers' output_type='latent'."""
    sigmas = get_sigmas(steps, calculate_mu(LATENT_SHAPE[2] * LATENT_SHAPE[3] // 4))
    x, _ = sample_node_path(transformer, True, prompt, None, torch.zeros(LATENT_SHAPE), noise, sigmas,
                       GuidanceCurve.constant(GUIDANCE), controls=controls, concat_latent=concat_latent)
    return pack(x)
