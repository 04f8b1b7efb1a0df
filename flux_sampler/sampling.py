"""The FLUX.1 denoising loop: a velocity model wrapped with conditioning and a guidance curve, integrated
with Euler steps in float32 (BFL `denoise`, diffusers `FlowMatchEulerDiscreteScheduler.step`).

The loop follows k-diffusion's protocol: progress, previews and interruption reach the host only through
`callback`, which may raise to stop sampling between steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .control import ControlResiduals, StepControl, residual_kwargs, with_concat_latent
from .guidance import GuidanceCurve
from .latents import make_img_ids, pack, unpack
from .progress import StepPosition

# callback(step, total_steps, x, denoised): called after each step with the new latent and the x0 estimate.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# scope(position, stream): a context entered around each transformer call, stream "positive" or "negative"
# (the step cache and fp8 calibration of a prepared transformer use it; see flux_speed.prepare).
EvaluationScope = Callable[[StepPosition, str], AbstractContextManager]


def _no_scope(position: StepPosition, stream: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TextConditioning:
    """T5 token embeddings (B, L, D) and the pooled CLIP-L vector (B, P) for one prompt."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def for_batch(self, batch: int) -> TextConditioning:
        """Repeat a single prompt over a latent batch; a batch of prompts must match the latent batch."""
        n = self.embeds.shape[0]
        if n == batch:
            return self
        if n != 1:
            raise ValueError(f"conditioning has batch {n} but the latent has batch {batch}: use 1 or {batch}")
        return TextConditioning(self.embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @property
    def base(self) -> TextConditioning:
        """The prompt ControlNets see (a regional conditioning's global prompt; see flux_sampler.regional)."""
        return self

    def joint_attention_kwargs(self, transformer: torch.nn.Module, position: StepPosition, latent_h: int,
                               latent_w: int, dtype: torch.dtype) -> dict | None:
        """Attention arguments for a positive-pass call: none for a plain prompt (regional prompts add a mask)."""
        return None


class FluxDenoiser:
    """Velocity of a diffusers `FluxTransformer2DModel` for (B, 16, H, W) model-space latents.

    Applies the guidance curve per step (distilled guidance embedding, when the model has one) and true
    CFG with the negative prompt inside the curve's window. `forward_calls` counts transformer evaluations.
    Optional `controls` add ControlNet residuals each step; `concat_latent` (B|1, 16, H, W, model space) is
    appended to the image tokens for BFL's structural (Canny/Depth-dev) models. `scope` is entered around each
    transformer call with the step's position and the prompt stream.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        positive: TextConditioning,
        negative: TextConditioning | None,
        curve: GuidanceCurve,
        steps: int,
        guidance_embeds: bool,
        compute_dtype: torch.dtype | None = None,
        controls: StepControl | None = None,
        concat_latent: torch.Tensor | None = None,
        scope: EvaluationScope | None = None,
    ) -> None:
        self.transformer = transformer
        self.scope = scope or _no_scope
        self.positive = positive
        self.negative = negative
        self.curve = curve
        self.steps = steps
        self.guidance_embeds = guidance_embeds
        self.compute_dtype = compute_dtype or next(transformer.parameters()).dtype
        self.forward_calls = 0
        self.guidance_history: list[float] = []
        self.controls = controls
        self.concat_latent = concat_latent

    def transformer_inputs(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextConditioning, guidance: float
    ) -> dict[str, torch.Tensor | None]:
        """The diffusers keyword inputs for one evaluation on (B, 16, H, W) latents, without control."""
        b, _, h, w = x.shape
        device = next(self.transformer.parameters()).device
        dtype = self.compute_dtype
        cond = cond.for_batch(b)
        txt = cond.embeds.to(device=device, dtype=dtype)
        ids_dtype = torch.float32
        return dict(
            hidden_states=pack(x.to(device=device, dtype=dtype)),
            encoder_hidden_states=txt,
            pooled_projections=cond.pooled.to(device=device, dtype=dtype),
            timestep=sigma.to(device=device, dtype=torch.float32).expand(b),
            guidance=(
                torch.full((b,), guidance, device=device, dtype=torch.float32) if self.guidance_embeds else None
            ),
            txt_ids=torch.zeros(txt.shape[1], 3, device=device, dtype=ids_dtype),
            img_ids=make_img_ids(h, w, device, ids_dtype),
        )

    def model_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: TextConditioning, guidance: float,
        residuals: ControlResiduals | None = None, attention: dict | None = None,
    ) -> torch.Tensor:
        """One transformer evaluation: pack, run, unpack; returns float32 (B, 16, H, W). `attention` is passed as
        diffusers' `joint_attention_kwargs` (a regional prompt's mask)."""
        _, _, h, w = x.shape
        inputs = self.transformer_inputs(x, sigma, cond, guidance)
        inputs["hidden_states"] = with_concat_latent(inputs["hidden_states"], self.concat_latent)
        extra = {"joint_attention_kwargs": attention} if attention is not None else {}
        out = self.transformer(**inputs, **residual_kwargs(residuals), **extra, return_dict=False)[0]
        self.forward_calls += 1
        return unpack(out, h, w).to(device=x.device, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        position = StepPosition(step, self.steps)
        guidance = self.curve.value_at(position.progress)
        self.guidance_history.append(guidance)
        residuals = None
        if self.controls is not None:
            inputs = self.transformer_inputs(x, sigma, self.positive.base, guidance)
            residuals = self.controls(inputs, guidance, step, self.steps)
        attention = self.positive.joint_attention_kwargs(self.transformer, position, x.shape[2], x.shape[3],
                                                         self.compute_dtype)
        with self.scope(position, "positive"):
            v_pos = self.model_velocity(x, sigma, self.positive, guidance, residuals, attention)
        if self.negative is None or not self.curve.cfg_active(position.progress):
            return v_pos
        with self.scope(position, "negative"):
            v_neg = self.model_velocity(x, sigma, self.negative, guidance, residuals)
        return v_neg + self.curve.cfg_scale * (v_pos - v_neg)


@torch.no_grad()
def sample_euler(
    velocity: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1] with Euler steps in float32."""
    x = x.to(torch.float32)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, sigma, i)
        denoised = x - sigma * v
        x = x + (sigma_next - sigma) * v
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def sample_flux(
    transformer: torch.nn.Module,
    guidance_embeds: bool,
    positive: TextConditioning,
    negative: TextConditioning | None,
    latent: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    curve: GuidanceCurve,
    compute_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
    controls: StepControl | None = None,
    concat_latent: torch.Tensor | None = None,
    scope: EvaluationScope | None = None,
) -> tuple[torch.Tensor, FluxDenoiser]:
    """Text-to-image (or image-to-image when `sigmas[0]` < 1) from a model-space `latent`.

    The start point is sigma0 * noise + (1 - sigma0) * latent (pure noise at sigma0 = 1); returns the
    model-space result and the denoiser (which recorded its forward calls and per-step guidance).
    `controls`, `concat_latent` and `scope` are passed to `FluxDenoiser` (ControlNets, structural models, the
    prepared transformer's per-call context). The FluxWorks Sampler reaches this through
    `flux_speed.prepare.sample_prepared`.
    """
    steps = len(sigmas) - 1
    denoiser = FluxDenoiser(transformer, positive, negative, curve, steps, guidance_embeds, compute_dtype,
                            controls, concat_latent, scope)
    sigma0 = sigmas[0].to(torch.float32)
    x = sigma0 * noise.to(torch.float32) + (1.0 - sigma0) * latent.to(torch.float32)
    return sample_euler(denoiser, x, sigmas.to(torch.float32), callback), denoiser
