"""Our loader + sampler against diffusers' FluxPipeline on the same tiny random weights (fp32)."""

import pytest
import torch

from devtools.tiny_models import write_flux
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, calculate_mu, get_sigmas
from fluxworks.flux_sampler.latents import make_noise, to_vae_space, unpack
from tests.node_path import sample_node_path
from tests.parity.conftest import make_pipeline, rel_err

H, W, STEPS, BATCH, SEED = 64, 48, 4, 2, 42
TOLERANCE = 1e-6  # about 3x the largest measured error (3.5e-7, BFL single file)


def diffusers_latent(pipe, embeds, pooled, guidance=3.5):
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=H, width=W, num_inference_steps=STEPS,
               guidance_scale=guidance, num_images_per_prompt=BATCH, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(SEED)).images
    return to_vae_space(unpack(out, H // 8, W // 8))  # raw VAE space, as ComfyUI's LATENT holds it


def our_latent(model, config, embeds, pooled, guidance=3.5):
    mu = calculate_mu((H // 16) * (W // 16)) if config.guidance_embeds else None
    shape = (BATCH, 16, H // 8, W // 8)
    x, _ = sample_node_path(model, config.guidance_embeds, TextConditioning(embeds, pooled), None, torch.zeros(shape),
                       make_noise(shape, SEED), get_sigmas(STEPS, mu), GuidanceCurve.constant(guidance))
    return to_vae_space(x)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
def test_final_latent_matches_flux_pipeline(tmp_path, transformers_by_variant, variant, fmt):
    reference = transformers_by_variant[variant]
    path = write_flux(str(tmp_path / ("m" if fmt == "diffusers" else "m.safetensors")), reference, fmt)
    model, config, _ = load_flux_transformer(path, "default", torch.float32)
    torch.manual_seed(5)
    embeds, pooled = torch.randn(1, 24, 64), torch.randn(1, 64)
    expected = diffusers_latent(make_pipeline(reference, variant), embeds, pooled)
    ours = our_latent(model, config, embeds, pooled)
    assert ours.shape == (BATCH, 16, H // 8, W // 8)
    assert not torch.allclose(ours[0], ours[1])  # distinct noise per batch item
    assert rel_err(ours, expected) <= TOLERANCE


def test_guidance_value_changes_the_dev_result_like_diffusers(transformers_by_variant):
    reference = transformers_by_variant["dev"]
    torch.manual_seed(6)
    embeds, pooled = torch.randn(1, 16, 64), torch.randn(1, 64)
    pipe = make_pipeline(reference, "dev")
    low, high = diffusers_latent(pipe, embeds, pooled, 1.5), diffusers_latent(pipe, embeds, pooled, 6.0)
    assert rel_err(low, high) > 1e-3
    assert rel_err(our_latent(reference, reference.config, embeds, pooled, 6.0), high) <= TOLERANCE
