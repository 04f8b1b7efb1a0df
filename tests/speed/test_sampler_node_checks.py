"""FluxWorks Sampler refuses what it cannot run before allocating anything: non-finite numbers, and sizes whose
activations cannot fit in free memory (an in-process ComfyUI host on the CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fluxworks.flux_sampler.memory import estimate_sampling_memory
from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures
from tests.lora.lora_helpers import conditioning, make_patcher


def run(fluxworks, patcher, latent, **kwargs):
    text = conditioning()
    settings = dict(seed=3, steps=2, guidance=3.5, shift=0.0, denoise=1.0) | kwargs
    return fluxworks.nodes.sampler.FluxWorksSampler().sample(
        patcher, [[text.embeds, {"pooled_output": text.pooled}]], {"samples": latent}, **settings)


@pytest.mark.parametrize("name", ["guidance", "shift", "denoise"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_settings_are_refused_by_name(pack, flux, name, bad):  # noqa: F811
    with pytest.raises(ValueError, match=f"{name} is"):
        run(pack, make_patcher(pack, flux), torch.zeros(1, 16, 8, 8), **{name: bad})


def test_an_impossible_size_is_refused_before_sampling(pack, flux, monkeypatch):  # noqa: F811
    """16384x16384 (the issue's case): refused with the estimate and the fix, before the first transformer call."""
    calls = []
    monkeypatch.setattr(type(flux), "forward", lambda *a, **k: calls.append(1))
    latent = torch.zeros(1, 16, 2048, 2048)
    with pytest.raises(MemoryError, match=r"16384x16384 at batch 1 .* needs about .* GiB .*lower width/height"):
        run(pack, make_patcher(pack, flux), latent)
    assert not calls


def test_the_estimate_grows_with_tokens_batch_and_width():
    base = estimate_sampling_memory(1, 128, 128, 512, 3072, 2)
    assert base.tokens == 64 * 64 + 512
    assert estimate_sampling_memory(2, 128, 128, 512, 3072, 2).total > 1.9 * base.total
    assert estimate_sampling_memory(1, 256, 256, 512, 3072, 2).total > 3.5 * base.total
    # The 12B model at 1024x1024 in bf16 peaked 0.5 GiB above its weights (H200): the estimate covers that.
    assert 0.5 * 1024**3 < base.total < 2 * 1024**3


def test_the_embedded_model_previews_through_its_own_vae(pack):  # noqa: F811
    """Its transformer names its VAE for previews; the sampler's previewer decodes with it (a linear FLUX.1 map
    shows wrong colours), and the preview of a latent matches that VAE's own decode."""
    import comfy.cli_args
    import latent_preview

    from evaluation.embedded import EMBEDDED_DIR, FILES, load_autoencoder
    from fluxworks.flux_models.files import preview_vae_name
    from fluxworks.flux_sampler.latents import to_model_space

    name = preview_vae_name(f"{EMBEDDED_DIR}/{FILES['transformer']}")
    assert name == "taef1_shapes_tiny.safetensors"
    old = comfy.cli_args.args.preview_method
    comfy.cli_args.args.preview_method = latent_preview.LatentPreviewMethod.Auto
    try:
        previewer = pack.nodes.host._previewer(torch.device("cpu"), name)
    finally:
        comfy.cli_args.args.preview_method = old
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shown = np.asarray(previewer.decode_latent_to_preview(to_model_space(latent)), dtype=np.int16)
        decoded = load_autoencoder(f"{EMBEDDED_DIR}/{FILES['vae']}").decode(latent)[0].permute(1, 2, 0)
    expected = np.asarray(latent_preview.preview_to_image(decoded), dtype=np.int16)
    assert shown.shape == expected.shape == (128, 128, 3)
    assert np.abs(shown - expected).max() <= 1  # the same picture, up to uint8 rounding


def test_the_sampler_keeps_the_prepared_transformer_until_the_model_is_unpatched(pack, flux):  # noqa: F811
    patcher = make_patcher(pack, flux)
    (first,) = run(pack, patcher, torch.zeros(1, 16, 8, 8))
    slot = patcher.model.prepared_slot
    kept = slot.prepared
    assert kept is not None
    (second,) = run(pack, patcher, torch.zeros(1, 16, 8, 8))
    assert slot.prepared is kept and torch.equal(first["samples"], second["samples"])
    patcher.unpatch_model()  # what the memory manager does when it unloads the model
    assert slot.prepared is None


def test_the_kept_transformer_follows_weights_merged_under_inference_mode(pack, flux):  # noqa: F811
    """ComfyUI runs prompts under torch.inference_mode, where a LoRA merge makes weights without version counters:
    the slot still sees the change (storage and core's merged-patches record) and prepares anew."""
    patcher = make_patcher(pack, flux)
    with torch.inference_mode():
        (before,) = run(pack, patcher, torch.zeros(1, 16, 8, 8))
        kept = patcher.model.prepared_slot.prepared
        key = "transformer.transformer_blocks.0.attn.to_q.weight"
        weight = patcher.model.state_dict()[key]
        lora = patcher.clone()
        lora.add_patches({key: (0.05 * torch.ones_like(weight),)}, 1.0)
        (after,) = run(pack, lora, torch.zeros(1, 16, 8, 8))
    assert patcher.model.prepared_slot.prepared is not kept
    assert not torch.equal(before["samples"], after["samples"])


def test_a_decoded_preview_is_made_at_most_at_the_preview_size(pack):  # noqa: F811
    """A VAE preview of a 2048x2048 latent took 34 s on 2 CPU cores with no cancel check: the previewer decodes the
    first image at ComfyUI's preview size at most; the linear (undecoded) preview and small latents are unchanged."""
    import latent_preview

    host = pack.nodes.host
    cells = latent_preview.MAX_PREVIEW_RESOLUTION // 8
    big = torch.randn(2, 16, 256, 128)
    small = torch.randn(2, 16, 16, 16)
    assert host._preview_latent(big, decoded=True).shape == (1, 16, cells, cells // 2)
    assert torch.equal(host._preview_latent(big, decoded=False), big[:1])
    assert torch.equal(host._preview_latent(small, decoded=True), small[:1])
