"""FluxWorksSampler: the FLUX.1 flow-matching sampler with per-step guidance and true-CFG windows."""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from ..flux_sampler.guidance import GuidanceCurve
from ..flux_sampler.latents import LATENT_CHANNELS, make_noise, to_model_space, to_vae_space
from ..flux_sampler.memory import estimate_sampling_memory, gib
from ..flux_sampler.sampling import TextConditioning
from ..flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len, shift_to_mu
from ..flux_speed.prepare import PreparedSlot, sample_prepared
from . import controlnet, host, multi_gpu, speed
from .regional import is_regional, regional_conditioning

logger = logging.getLogger(__name__)


def flux_conditioning(conditioning, name: str, width: int,
                      image_hw: tuple[int, int] | None = None) -> TextConditioning:
    """Core CONDITIONING ([[t5_tokens, {"pooled_output": ...}]]) -> TextConditioning, checked. With `image_hw`
    (the positive prompt), regions core nodes or FluxWorksRegionalPrompt put on it become a RegionalConditioning
    (nodes/regional.py)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name} conditioning is empty: connect a text encode node")
    if image_hw is not None and is_regional(conditioning):
        return regional_conditioning(conditioning, name, width, image_hw)
    if len(conditioning) > 1:
        raise ValueError(f"{name} conditioning holds {len(conditioning)} prompts (Conditioning Combine?); "
                         "FluxWorksSampler takes one prompt here (regions apply to the positive prompt only)")
    tokens, extras = conditioning[0]
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError(f"{name} conditioning has no pooled_output: it was not made by a FLUX.1 text encoder")
    if tokens.ndim != 3 or tokens.shape[-1] != width:
        raise ValueError(f"{name} conditioning has T5 width {tokens.shape[-1]}, but the model expects {width}: "
                         "the text encoders and the model do not belong together")
    return TextConditioning(tokens, pooled)


def checked_latent(latent: dict) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ValueError("latent_image must be a LATENT with 4-D samples (batch, 16, height/8, width/8)")
    if samples.shape[1] != LATENT_CHANNELS:
        if samples.count_nonzero() == 0:  # a 4-channel EmptyLatentImage: widen, as core does
            samples = torch.zeros(samples.shape[0], LATENT_CHANNELS, *samples.shape[2:], dtype=samples.dtype)
        else:
            raise ValueError(f"latent has {samples.shape[1]} channels; FLUX.1 latents have 16 "
                             "(use EmptySD3LatentImage or VAEEncode with the FLUX.1 VAE)")
    h, w = samples.shape[2:]
    if h % 2 or w % 2:
        raise ValueError(f"image size {w * 8}x{h * 8} is not a multiple of 16 in both width and height, "
                         "which FLUX.1 needs (2x2 latent patches): pick e.g. "
                         f"{(w // 2) * 16}x{(h // 2) * 16}")
    return samples


def prepared_slot(flux) -> PreparedSlot:
    """The FLUX_MODEL's slot for the prepared transformer kept between prompts (see PreparedSlot)."""
    if flux.prepared_slot is None:
        flux.prepared_slot = PreparedSlot()
    return flux.prepared_slot


def check_memory(flux, samples: torch.Tensor, pos: TextConditioning, neg: TextConditioning | None,
                 device: torch.device) -> None:
    """Refuse, before sampling allocates anything, a size or batch whose activations cannot fit in what is free on
    `device` once the model is loaded (see flux_sampler/memory.py for the estimate)."""
    batch, _, h, w = samples.shape
    text = max(pos.embeds.shape[1], neg.embeds.shape[1] if neg is not None else 0)
    width = flux.config.num_attention_heads * flux.config.attention_head_dim
    need = estimate_sampling_memory(batch, h, w, text, width, torch.finfo(flux.compute_dtype).bits // 8)
    free = host.free_device_memory(device)
    if need.total > free:
        raise MemoryError(
            f"FluxWorksSampler: {w * 8}x{h * 8} at batch {batch} ({need.tokens} tokens per image) needs about "
            f"{gib(need.total)} for sampling beyond the model's weights, but only {gib(free)} is free on {device}: "
            "lower width/height or batch_size (FLUX.1 is made for up to about 2 megapixels, e.g. 1024x1024), or "
            "free memory by closing other programs")


class FluxWorksSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (host.FLUX_MODEL,),
                "positive": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                                  "tooltip": "dev: 20-50, schnell: 4."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Distilled guidance (dev); replaced by a connected schedule."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "0 = auto (dev: resolution-dependent, schnell: none); "
                                               "otherwise a constant SD3-style shift factor."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Below 1 keeps part of the input latent (img2img)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Used for true CFG inside the schedule's window."}),
                "guidance_schedule": (host.FLUX_GUIDANCE,),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Samples FLUX.1 with scheduled distilled guidance and optional windowed true CFG."

    def sample(self, model, positive, latent_image, seed: int, steps: int, guidance: float, shift: float,
               denoise: float, negative=None, guidance_schedule: GuidanceCurve | None = None):
        patcher = host.expect(model, host.FLUX_MODEL, "FluxWorksSampler")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        for name, value in (("guidance", guidance), ("shift", shift), ("denoise", denoise)):
            if not math.isfinite(value):
                raise ValueError(f"FluxWorksSampler: {name} is {value}; it must be a finite number "
                                 f"(e.g. guidance 3.5, shift 0 = auto, denoise 1.0)")
        if denoise <= 0:
            raise ValueError("denoise is 0: nothing to sample (use a value in (0, 1])")
        samples = checked_latent(latent_image)
        flux = patcher.model
        width = flux.config.joint_attention_dim
        pos = flux_conditioning(positive, "positive", width, image_hw=(samples.shape[2] * 8, samples.shape[3] * 8))
        neg = flux_conditioning(negative, "negative", width) if negative is not None else None
        curve = guidance_schedule if guidance_schedule is not None else GuidanceCurve.constant(guidance)
        if neg is not None and curve.cfg_scale == 1.0:
            logger.info("FluxWorksSampler: negative prompt connected but cfg_scale is 1; it is not evaluated")
        if neg is None and curve.cfg_scale != 1.0:  # diffusers' FluxPipeline also disables true CFG here, with a warning
            logger.warning("FluxWorksSampler: the guidance schedule asks for true CFG (cfg_scale %s) but no negative "
                           "prompt is connected, so true CFG is off; connect a negative CONDITIONING (an empty "
                           "prompt works) to use it", curve.cfg_scale)
        if shift > 0:
            mu = shift_to_mu(shift)
        elif flux.config.guidance_embeds:
            mu = calculate_mu(image_seq_len(*samples.shape[2:]))
        else:
            mu = None
        sigmas = get_sigmas(steps, mu, denoise)
        noise = make_noise(samples.shape, seed)
        controls = controlnet.SamplerControls(positive, negative, flux, samples)
        options = speed.speed_options(patcher)
        plan = multi_gpu.parallel_plan(patcher)
        if plan is not None:  # FluxWorks Multi-GPU: the workers sample; this process loads nothing on a GPU
            x = multi_gpu.sample_on_workers(
                patcher, plan, options, has_controls=bool(controls.applied), steps=steps, positive=pos,
                negative=neg, latent=to_model_space(samples.to(torch.float32)), noise=noise, sigmas=sigmas,
                curve=curve)
            return (dict(latent_image, samples=to_vae_space(x).to(host.intermediate_device())),)
        with contextlib.ExitStack() as cleanup:
            if options.offload:  # not a full load: blocks are streamed from CPU memory (see host)
                device = cleanup.enter_context(host.streamed_on_device(
                    patcher, options.offload_resident_blocks, [c.patcher for c in controls.applied]))
            else:
                device = controls.load_models(patcher)
            stack, concat_latent = controls.on_device(device, flux.config)
            check_memory(flux, samples, pos, neg, device)
            callback = host.step_callback(device, steps, flux.preview_vae)
            x, _, prepared = sample_prepared(
                flux.transformer, options, device, flux.compute_dtype,
                interrupt=host.check_interrupt, slot=prepared_slot(flux), weights_tag=host.merged_patches(patcher), guidance_embeds=flux.config.guidance_embeds, positive=pos, negative=neg,
                latent=to_model_space(samples.to(torch.float32)).to(device), noise=noise.to(device),
                sigmas=sigmas.to(device), curve=curve, callback=callback, controls=stack, concat_latent=concat_latent)
        if prepared.cache is not None:
            logger.info("FluxWorksSampler: step cache reused the deep blocks on %d of %d model evaluations "
                        "(steps %s)", prepared.cache.hits, prepared.cache.hits + prepared.cache.misses,
                        prepared.cache.reused_steps)
        out = dict(latent_image)
        out["samples"] = to_vae_space(x).to(host.intermediate_device())
        return (out,)


NODE_CLASS_MAPPINGS = {"FluxWorksSampler": FluxWorksSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxWorksSampler": "FluxWorks Sampler"}
