"""One training run as the Train LoRA node asks for it: memory checked first, fp8 base weights if wanted, the
trainer with progress and interrupt, the LoRA file and its state written (also when stopped), the loss curve."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import Bucket, CachedDataset
from .fp8_base import FP8, fp8_base_weights
from .lora import lora_target_modules
from .memory import TrainingMemory, check_fits, estimate_training_memory, lora_parameter_count
from .trainer import LoraTrainer, StepReport, TrainSettings


@dataclass
class TrainResult:
    path: str
    losses: list[float]
    steps_done: int


def _weights_bytes_fp8(transformer: torch.nn.Module) -> int:
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith(("x_embedder", "context_embedder",
                                                                         "time_text_embed", "norm_out", "proj_out")):
            total -= module.weight.numel() * (module.weight.element_size() - FP8.itemsize)
    return total + sum(t.numel() * t.element_size() for t in list(transformer.parameters()) + list(transformer.buffers()))


def check_memory(transformer: torch.nn.Module, dataset: CachedDataset, settings: TrainSettings, device: torch.device,
                 compute_bytes: int, available: int, fp8_base: bool) -> TrainingMemory:
    """Refuse (MemoryError naming the parts and the options) a run whose estimated peak exceeds `available`;
    returns the estimate (with the weights as they will be stored)."""
    params = lora_parameter_count(transformer, lora_target_modules(transformer, settings.lora_layers), settings.rank)
    biggest = max(dataset.buckets, key=lambda b: b.latents.shape[2] * b.latents.shape[3])
    hw, tokens = tuple(biggest.latents.shape[2:]), biggest.text.shape[1]

    def estimate(checkpointing: bool):
        return estimate_training_memory(transformer, params, settings.batch_size, hw, tokens, compute_bytes,
                                        checkpointing, settings.optimizer)

    memory = estimate(settings.gradient_checkpointing)
    fp8_weights = _weights_bytes_fp8(transformer)
    if fp8_base:
        memory = type(memory)(fp8_weights, memory.lora, memory.activations)
    check_fits(memory, available, str(device), settings.gradient_checkpointing, fp8_base, fp8_weights,
               estimate(True).activations)
    return memory


def ordinary_tensors(transformer: torch.nn.Module) -> int:
    """Replace the transformer's inference tensors (made under `torch.inference_mode`, as ComfyUI runs every node,
    so a model loaded in ComfyUI has only those) by ordinary copies with the same values: autograd refuses to save
    an inference tensor for the backward pass, and every frozen linear weight under a LoRA is saved (for the
    gradient of its input). One tensor at a time, so the peak is the largest weight twice. Returns how many."""
    replaced = 0
    for module in transformer.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.is_inference():
                    continue
                copy = tensor.detach().clone()
                table[name] = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad) \
                    if isinstance(tensor, torch.nn.Parameter) else copy
                replaced += 1
    return replaced


def _ordinary_dataset(dataset: CachedDataset, device: torch.device) -> CachedDataset:
    """The dataset on `device` as ordinary tensors (see `ordinary_tensors`)."""
    moved = dataset.to(device)
    return CachedDataset([Bucket(b.latents.clone(), b.text.clone(), b.pooled.clone(), b.captions)
                          for b in moved.buckets], moved.empty_text.clone(), moved.empty_pooled.clone(),
                         moved.caption_dropout)


def run_training(transformer: torch.nn.Module, dataset: CachedDataset, settings: TrainSettings, device: torch.device,
                 path: str, compute: torch.dtype, resume: str | None = None, fp8_base: bool = False,
                 save_every: int = 0, progress: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Train on `transformer` (already on `device`), writing `path` (+ its state) at the end, every `save_every`
    steps, and when `progress` raises (ComfyUI's interrupt): the exception then propagates after the save.
    Runs with autograd on and outside inference mode whatever the caller's mode (ComfyUI executes nodes in
    `torch.inference_mode`)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        ordinary_tensors(transformer)
        data = _ordinary_dataset(dataset, device)
        if fp8_base:
            stack.enter_context(fp8_base_weights(transformer, compute))
        trainer = stack.enter_context(LoraTrainer(transformer, settings, device, resume=resume))
        losses = trainer.train(trainer.dataset_loss(data), progress=progress, checkpoint=path, save_every=save_every)
        return TrainResult(path, list(losses), trainer.step)


@torch.no_grad()
def validation_latent(transformer: torch.nn.Module, guidance_embeds: bool, text: torch.Tensor, pooled: torch.Tensor,
                      latent_hw: tuple[int, int], steps: int, guidance: float, seed: int,
                      device: torch.device, compute: torch.dtype) -> torch.Tensor:
    """One model-space latent (1, 16, H, W) sampled by the pack's sampler (Euler, the dev shift at this size) from
    the transformer as it is right now, adapter included: the Train LoRA node's validation preview."""
    from ..flux_sampler.guidance import GuidanceCurve
    from ..flux_sampler.latents import LATENT_CHANNELS, make_noise
    from ..flux_sampler.sampling import TextConditioning, sample_flux
    from ..flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len

    noise = make_noise((1, LATENT_CHANNELS, *latent_hw), seed).to(device)
    sigmas = get_sigmas(steps, calculate_mu(image_seq_len(*latent_hw)) if guidance_embeds else None).to(device)
    cond = TextConditioning(text[:1].to(device), pooled[:1].to(device))
    x, _ = sample_flux(transformer, guidance_embeds, cond, None, torch.zeros_like(noise), noise, sigmas,
                       GuidanceCurve.constant(guidance), compute)
    return x
