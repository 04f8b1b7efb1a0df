"""Structural control seen from the sampler: ControlNet residuals added after the transformer's blocks, and
the control latent BFL's FLUX.1-Canny/Depth-dev models take concatenated to the image tokens.

The denoiser stays ignorant of ControlNet formats: it hands a `StepControl` the transformer inputs of the
positive prompt once per step and passes back whatever residuals it returns (diffusers' FluxControlNetPipeline
likewise reuses the positive residuals for the true-CFG negative pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .latents import pack


@dataclass(frozen=True)
class ControlResiduals:
    """Per-block additions to the image tokens: one (B, L, D) tensor per double / single block of the
    transformer (already expanded to its depth), or None where no control reaches that stack."""

    block_samples: list[torch.Tensor] | None
    single_block_samples: list[torch.Tensor] | None


class StepControl(Protocol):
    def __call__(
        self, inputs: dict[str, Any], guidance: float, step: int, steps: int
    ) -> ControlResiduals | None:
        """Residuals for step `step` of `steps` from the transformer inputs (diffusers keyword names)."""
        ...


def residual_kwargs(residuals: ControlResiduals | None) -> dict[str, Any]:
    """Keyword arguments for diffusers' `FluxTransformer2DModel.forward` (lists already full depth)."""
    if residuals is None:
        return {}
    return {
        "controlnet_block_samples": residuals.block_samples,
        "controlnet_single_block_samples": residuals.single_block_samples,
    }


def with_concat_latent(hidden_states: torch.Tensor, concat_latent: torch.Tensor | None) -> torch.Tensor:
    """Append a (B|1, 16, H, W) model-space control latent to packed image tokens (B, L, 64) -> (B, L, 128),
    as diffusers' FluxControlPipeline does for FLUX.1-Canny/Depth-dev."""
    if concat_latent is None:
        return hidden_states
    tokens = pack(concat_latent.to(device=hidden_states.device, dtype=hidden_states.dtype))
    batch, length = hidden_states.shape[:2]
    if tokens.shape[1] != length:
        raise ValueError(f"the control latent has {tokens.shape[1]} tokens but the image has {length}: "
                         "it must be encoded at the output size")
    if tokens.shape[0] not in (1, batch):
        raise ValueError(f"the control latent batch is {tokens.shape[0]} but the latent batch is {batch}: use 1 or "
                         f"{batch} control images")
    return torch.cat([hidden_states, tokens.expand(batch, -1, -1)], dim=2)
