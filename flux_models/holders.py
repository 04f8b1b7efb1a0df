"""The objects the nodes pass around: plain modules ComfyUI's ModelPatcher can move between devices."""

from __future__ import annotations

import torch

from .transformer import FluxConfig


class FluxModel(torch.nn.Module):
    """A diffusers FLUX.1 transformer plus what the sampler needs to know about it."""

    def __init__(self, transformer: torch.nn.Module, config: FluxConfig, compute_dtype: torch.dtype,
                 source: str, preview_vae: str | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = config
        self.compute_dtype = compute_dtype
        self.source = source
        self.preview_vae = preview_vae  # VAE file for previews of a non-FLUX.1 latent space (files.PREVIEW_VAE_KEY)
        # The sampler's flux_speed.prepare.PreparedSlot: the prepared transformer kept between prompts while these
        # weights stay loaded (created by the sampler on first use; released through `release_prepared`).
        self.prepared_slot = None
        # The FluxWorks Multi-GPU worker pool (flux_parallel.pool.WorkerPool) sampling with these weights, kept between
        # prompts so the workers keep theirs; created and replaced by the Multi-GPU path of the sampler.
        self.parallel_workers = None

    def release_prepared(self) -> None:
        """Drop the prepared transformer kept between prompts (its fp8 copies and compiled blocks' guards): the host
        calls this when the weights are unpatched or leave the device."""
        if self.prepared_slot is not None:
            self.prepared_slot.release()
        self.device = torch.device("cpu")  # ModelPatcher keeps this attribute up to date

    @property
    def variant(self) -> str:
        return self.config.variant


class FluxTextEncoder(torch.nn.Module):
    """T5-XXL and CLIP-L with their tokenizers."""

    def __init__(self, t5: torch.nn.Module, clip: torch.nn.Module, tokenizers, compute_dtype: torch.dtype,
                 sources: tuple[str, str]) -> None:
        super().__init__()
        self.t5 = t5
        self.clip = clip
        self.tokenizers = tokenizers
        self.compute_dtype = compute_dtype
        self.sources = sources
        self.device = torch.device("cpu")
