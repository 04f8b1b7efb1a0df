"""The FluxWorks Sampler's own sampling path for tests: `sample_prepared` with the options a FLUX_MODEL carries
when no Speed node is in the graph (or the given ones), on the CPU in fp32, with an interrupt check as the node
passes one (so the per-block hooks are in the path too). Parity tests call this, never `sample_flux` directly."""

from __future__ import annotations

import torch

from fluxworks.flux_speed.prepare import SpeedOptions, sample_prepared

CPU = torch.device("cpu")


def _never_interrupted() -> None:
    return None


def sample_node_path(transformer, guidance_embeds: bool, positive, negative, latent, noise, sigmas, curve,
                     compute_dtype=None, callback=None, controls=None, concat_latent=None,
                     options: SpeedOptions | None = None, return_prepared: bool = False):
    """Same arguments as `sample_flux` (plus `options`); returns (latent, denoiser[, prepared])."""
    options = options if options is not None else SpeedOptions.defaults_for(CPU)
    dtype = compute_dtype or next(transformer.parameters()).dtype
    x, denoiser, prepared = sample_prepared(
        transformer, options, CPU, dtype, interrupt=_never_interrupted, guidance_embeds=guidance_embeds,
        positive=positive, negative=negative, latent=latent, noise=noise, sigmas=sigmas, curve=curve,
        callback=callback, controls=controls, concat_latent=concat_latent)
    return (x, denoiser, prepared) if return_prepared else (x, denoiser)
