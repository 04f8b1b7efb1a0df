"""What training builds is what the loaders rebuild: freshly initialised training models, exported in the
shipped formats, give the same outputs once loaded by flux_models (and once reloaded for resuming)."""

from __future__ import annotations

import os

import torch

from fluxworks.flux_models.text_encoders import Tokenizers, encode, load_clip_l, load_t5
from fluxworks.flux_models.transformer import load_flux_transformer
from tests.paths import tokenizer_folders
from training.flux_model import build_flux, export_flux, velocity
from training.resume import load_flux_weights, load_text_weights
from training.text_encoders import CaptionTokens, build_text_encoders, encode_text, export_text_encoders

CAPTION = "a small red star at the top left and a large blue circle in the center, on a white background"


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh weights with every parameter nudged, so zero-initialised layers also carry information."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def test_text_encoders_round_trip_through_the_comfyui_loaders(tmp_path):
    tokenizers = Tokenizers.from_folders(*tokenizer_folders())
    t5, clip = (_perturbed(m, 1) for m in build_text_encoders(0))
    export_text_encoders(t5, clip, str(tmp_path), "t5.safetensors", "clip.safetensors", dtype=torch.float32)
    loaded_t5 = load_t5(str(tmp_path / "t5.safetensors"), None, torch.float32)
    loaded_clip = load_clip_l(str(tmp_path / "clip.safetensors"), torch.float32)
    tokens = CaptionTokens.from_captions(tokenizers, [CAPTION])
    for length in (128, 512):
        t5_ids, clip_ids = tokens.batch(torch.tensor([0]), length)
        with torch.no_grad():
            embeds, pooled = encode_text(t5, clip, t5_ids, clip_ids)
        reference = encode(loaded_t5, loaded_clip, tokenizers, CAPTION, None, length, torch.device("cpu"))
        torch.testing.assert_close(embeds, reference.t5_embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled, reference.clip_pooled, atol=1e-4, rtol=1e-4)
    fresh_t5, fresh_clip = build_text_encoders(5)
    load_text_weights(fresh_t5, fresh_clip, str(tmp_path / "t5.safetensors"), str(tmp_path / "clip.safetensors"))
    with torch.no_grad():
        again = encode_text(fresh_t5.eval(), fresh_clip.eval(), t5_ids, clip_ids)
    torch.testing.assert_close(again[0], embeds, atol=1e-4, rtol=1e-4)


def test_transformer_round_trips_through_the_bfl_file(tmp_path):
    model = _perturbed(build_flux(0), 2)
    path = export_flux(model, os.path.join(tmp_path, "flux.safetensors"), dtype=torch.float32)
    loaded, config, _ = load_flux_transformer(path, "default", torch.float32)
    assert (config.num_layers, config.num_single_layers, config.guidance_embeds) == (2, 1, True)
    x, txt, pooled = torch.randn(2, 16, 16, 16), torch.randn(2, 256, 64), torch.randn(2, 64)
    sigma, guidance = torch.tensor([0.3, 0.9]), torch.tensor([1.0, 4.0])
    with torch.no_grad():
        expected = velocity(model, x, sigma, txt, pooled, guidance)
        torch.testing.assert_close(velocity(loaded, x, sigma, txt, pooled, guidance), expected)
        resumed = build_flux(7)
        load_flux_weights(resumed, path)
        torch.testing.assert_close(velocity(resumed.eval(), x, sigma, txt, pooled, guidance), expected)
