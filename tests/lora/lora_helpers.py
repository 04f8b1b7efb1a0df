"""Shared helpers of the LoRA tests: an independent oracle for merged weights, patchers and sampling."""

from __future__ import annotations

import copy

import torch

from devtools.tiny_models import diffusers_to_bfl
from fluxworks.flux_models.transformer import infer_config
from fluxworks.flux_models.transformer_keys import bfl_to_diffusers
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_sampler.sampling import TextConditioning
from fluxworks.flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len
from tests.node_path import sample_node_path

LATENT_SHAPE = (1, 16, 8, 8)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def expected_weights(base: dict[str, torch.Tensor], bfl_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Oracle: add dense deltas to the BFL-layout weights, then convert with the model loader's own BFL ->
    diffusers code (which knows nothing about LoRAs)."""
    bfl = diffusers_to_bfl(base)
    for name, delta in bfl_deltas.items():
        bfl[name + ".weight"] = bfl[name + ".weight"] + delta
    return bfl_to_diffusers(bfl)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def make_patcher(pack, transformer, compute_dtype=torch.float32, private_copy: bool = True):
    """A FLUX_MODEL (ModelPatcher over a FluxModel holder) around a private copy of `transformer` (models with
    diffusers layerwise-casting hooks cannot be deep-copied: pass them with `private_copy=False`)."""
    model = copy.deepcopy(transformer) if private_copy else transformer
    config = infer_config({k: v for k, v in model.state_dict().items()})
    holder = pack.flux_models.holders.FluxModel(model, config, compute_dtype, "tiny")
    return pack.nodes.host.wrap_patcher(holder, torch.device("cpu"), torch.device("cpu"))


def loaded_weights(pack, patcher) -> dict[str, torch.Tensor]:
    """Load `patcher` as the sampler does and return the transformer's weights as they are used."""
    pack.nodes.host.load_on_device(patcher)
    return {k: v.detach().clone() for k, v in patcher.model.transformer.state_dict().items()}


def conditioning(seed: int = 1, width: int = 64) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(torch.randn(1, 8, width, generator=g), torch.randn(1, 64, generator=g))


def sample(transformer, steps: int = 3, seed: int = 0, compute_dtype=None) -> torch.Tensor:
    """A short dev-style text-to-image run (model-space latent) with fixed noise and conditioning."""
    sigmas = get_sigmas(steps, calculate_mu(image_seq_len(*LATENT_SHAPE[2:])))
    noise = make_noise(LATENT_SHAPE, seed)
    x, _ = sample_node_path(transformer, True, conditioning(), None, torch.zeros(LATENT_SHAPE), noise, sigmas,
                       GuidanceCurve.constant(3.5), compute_dtype)
    return x


def sample_patcher(pack, patcher, steps: int = 3) -> torch.Tensor:
    pack.nodes.host.load_on_device(patcher)
    holder = patcher.model
    return sample(holder.transformer, steps, compute_dtype=holder.compute_dtype)
