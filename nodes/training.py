"""FluxWorksLoraDataset (pictures + captions -> an encoded training set) and FluxWorksTrainLora (a FLUX_MODEL and
that set -> a LoRA file in models/loras, a LORA_STACK of it, the loss curve).

The numerics live in flux_training/: reading and bucketing pictures (images.py), encoding once (data.py), the
memory check and the run (job.py), the loop and the file (trainer.py, lora.py). These nodes check inputs, load
models through ComfyUI's memory manager (host) and report progress.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..flux_models.text_encoders import encode
from ..flux_sampler.latents import LATENT_CHANNELS, to_model_space, to_vae_space
from ..flux_training import LORA_LAYERS, TIMESTEP_SAMPLING, CachedDataset, TrainSettings
from ..flux_training.curve import loss_curve_image
from ..flux_training.data import encode_examples
from ..flux_training.images import fit, from_batch, read_folder
from ..flux_training.job import check_memory, run_training, validation_latent
from ..flux_training.trainer import LR_SCHEDULES, StepReport, state_path
from . import host
from .lora import LORA_STACK

logger = logging.getLogger(__name__)

FLUX_LORA_DATASET = "FLUX_LORA_DATASET"
T5_LENGTHS = ("512", "256", "128")
NO_RESUME = "none"
_DEFAULTS = TrainSettings()


def optimizer_choices() -> list[str]:
    """AdamW always; bitsandbytes' 8-bit AdamW only where that package is installed."""
    return ["adamw"] + (["adamw8bit"] if importlib.util.find_spec("bitsandbytes") is not None else [])


@dataclass
class LoraDataset:
    """What FluxWorksLoraDataset passes on: the encoded set and where it came from (for messages)."""

    data: CachedDataset
    source: str
    text_width: int


def dataset_folder(folder: str) -> str:
    """A folder under ComfyUI's input folder; ValueError for an empty name or one that leaves the input folder."""
    root = os.path.realpath(host.input_directory())
    name = folder.strip()
    if not name:
        raise ValueError("FluxWorksLoraDataset: folder is empty and no images are connected: name a folder under "
                         f"{root} holding name.png + name.txt pairs, or connect an IMAGE batch and captions")
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"FluxWorksLoraDataset: folder {folder!r} is outside ComfyUI's input folder {root}: give a "
                         "folder inside it")
    return path


def _vae_encoder(vae):
    """(1, H, W, 3) uint8 -> (1, 16, H/8, W/8) model-space latent through a core VAE (the FLUX.1 VAE's space)."""

    def encode_pictures(pixels: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(pixels.float() / 255.0)
        if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"the VAE gives {tuple(latent.shape[1:2])}-channel latents; FLUX.1 training needs the "
                             "FLUX.1 VAE (ae.safetensors, or the embedded model's taef1_shapes_tiny)")
        return to_model_space(latent.float())

    return encode_pictures


class FluxWorksLoraDataset:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (host.FLUX_TEXT_ENCODER,),
                "vae": ("VAE", {"tooltip": "The FLUX.1 VAE: pictures are encoded once, before training."}),
                "folder": ("STRING", {"default": "", "tooltip": (
                    "A folder under ComfyUI's input folder with name.png + name.txt pairs (also .jpg, .webp). "
                    "Ignored when images are connected.")}),
                "instance_prompt": ("STRING", {"default": "", "multiline": False, "tooltip": (
                    "Caption for pictures without one (e.g. 'a photo of sks person'); empty = every picture "
                    "needs its caption.")}),
                "resolution": ("INT", {"default": 512, "min": 0, "max": 4096, "step": 16, "tooltip": (
                    "Aspect-ratio buckets of about resolution x resolution pixels (sides multiples of 16); 0 = "
                    "use pictures at their own size (both sides must be multiples of 16).")}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": (
                    "Share of training samples that get the empty prompt instead of their caption.")}),
                "max_sequence_length": (list(T5_LENGTHS), {"default": "512", "tooltip": (
                    "T5 tokens per caption: 512 as dev was trained; the embedded shapes model uses 128.")}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Pictures as a batch, instead of a folder."}),
                "captions": ("STRING", {"default": "", "multiline": True, "tooltip": (
                    "One caption per line, in the batch's order (with images).")}),
            },
        }

    RETURN_TYPES = (FLUX_LORA_DATASET,)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "build"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Pictures and captions for FluxWorks Train LoRA, from a folder under input/ (name.png + name.txt) "
                   "or an IMAGE batch; encoded once (VAE latents, T5 + CLIP-L), so the VAE and text encoders are "
                   "not needed while training.")

    def build(self, text_encoder, vae, folder: str, instance_prompt: str, resolution: int, caption_dropout: float,
              max_sequence_length: str, images=None, captions: str = ""):
        node = "FluxWorksLoraDataset"
        te = host.expect(text_encoder, host.FLUX_TEXT_ENCODER, node)
        if str(max_sequence_length) not in T5_LENGTHS:
            raise ValueError(f"{node}: max_sequence_length must be one of {', '.join(T5_LENGTHS)}, "
                             f"got {max_sequence_length!r}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"{node}: caption_dropout must be in [0, 1), got {caption_dropout}")
        if resolution < 0 or resolution % 16:
            raise ValueError(f"{node}: resolution must be 0 (no buckets) or a multiple of 16, got {resolution}")
        if images is not None:
            examples = from_batch(np.asarray(images.float().cpu()), captions or "", instance_prompt)
            source = f"an IMAGE batch of {len(examples)}"
        else:
            path = dataset_folder(folder)
            examples = read_folder(path, instance_prompt)
            source = path
        pictures = [fit(e, resolution) for e in examples]  # every size checked before anything is encoded
        device = host.load_on_device(te)
        holder = te.model
        length = int(max_sequence_length)

        def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            done = [encode(holder.t5, holder.clip, holder.tokenizers, t, None, length, device,
                           interrupt=host.check_interrupt) for t in texts]
            long = [t for t, d in zip(texts, done, strict=True) if d.t5_dropped_tokens]
            if long:
                logger.warning("%s: %d captions are longer than %d T5 tokens and were truncated (first: %r)", node,
                               len(long), length, long[0][:80])
            return (torch.cat([d.t5_embeds.float().cpu() for d in done]),
                    torch.cat([d.clip_pooled.float().cpu() for d in done]))

        data = encode_examples(pictures, [e.caption for e in examples], _vae_encoder(vae), encode_texts,
                               caption_dropout, interrupt=host.check_interrupt)
        text = f"{len(data)} pictures from {source}; buckets {data.sizes}"
        logger.info("%s: %s", node, text)
        dataset = LoraDataset(data, source, int(data.empty_text.shape[-1]))
        return {"ui": {"text": [text]}, "result": (dataset,)}


def _lora_path(lora_name: str) -> tuple[str, str]:
    """(listed name, absolute path) of the output file in models/loras; ValueError for a bad name."""
    name = lora_name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or name != os.path.basename(name) or name in (".", ".."):
        raise ValueError(f"FluxWorksTrainLora: lora_name {lora_name!r} must be a plain file name (no folders), e.g. "
                         "'my_lora'")
    return f"{name}.safetensors", os.path.join(host.lora_output_folder(), f"{name}.safetensors")


class FluxWorksTrainLora:
    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {
            "required": {
                "flux_model": (host.FLUX_MODEL,),
                "dataset": (FLUX_LORA_DATASET,),
                "lora_name": ("STRING", {"default": "my_flux_lora", "tooltip": (
                    "Saved as models/loras/<lora_name>.safetensors (diffusers' train_dreambooth_lora_flux.py "
                    "layout) with its training state beside it.")}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 100000, "tooltip": "Optimiser steps."}),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 256}),
                "alpha": ("FLOAT", {"default": d.alpha, "min": 0.01, "max": 1024.0, "step": 0.5, "tooltip": (
                    "LoRA scale = alpha / rank.")}),
                "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "round": False}),
                "lr_schedule": (list(LR_SCHEDULES), {"default": d.lr_schedule}),
                "lr_warmup_steps": ("INT", {"default": d.lr_warmup_steps, "min": 0, "max": 100000}),
                "optimizer": (optimizer_choices(), {"default": d.optimizer, "tooltip": (
                    "adamw8bit (bitsandbytes' 8-bit AdamW) is listed when bitsandbytes is installed.")}),
                "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 256}),
                "gradient_accumulation": ("INT", {"default": d.gradient_accumulation, "min": 1, "max": 256}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing, "tooltip": (
                    "Recompute activations in the backward pass: much less memory, about a third slower.")}),
                "fp8_base": ("BOOLEAN", {"default": False, "tooltip": (
                    "Keep the frozen base weights in fp8 while training (half of bf16's memory); the model is "
                    "restored exactly afterwards.")}),
                "timestep_sampling": (list(TIMESTEP_SAMPLING), {"default": d.timestep_sampling, "tooltip": (
                    "flux_shift: logit-normal shifted for the image size, as the sampler spends its steps; "
                    "logit_normal / uniform as diffusers' script.")}),
                "guidance": ("FLOAT", {"default": d.guidance, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": (
                    "Distilled guidance the model gets while training (dev only; 1.0 as kohya's default).")}),
                "lora_layers": (list(LORA_LAYERS), {"default": d.lora_layers, "tooltip": (
                    "attention, attention + MLP (diffusers' script default) or all linear layers.")}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": (
                    "Also save the file every N steps (0 = only at the end and when cancelled).")}),
            },
            "optional": {
                "resume_lora": ([NO_RESUME] + host.filename_list("loras"), {"default": NO_RESUME, "tooltip": (
                    "Continue from this LoRA (and its .state.safetensors optimiser state when present); same "
                    "rank and layers.")}),
                "validation_prompt": ("CONDITIONING", {"tooltip": (
                    "A prompt (FluxWorks Text Encode) sampled every validate_every steps, shown on the node.")}),
                "validation_vae": ("VAE", {"tooltip": "Decodes the validation image."}),
                "validate_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "0 = no validation."}),
                "validation_steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "validation_guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
            },
        }

    RETURN_TYPES = (LORA_STACK, "IMAGE", "STRING")
    RETURN_NAMES = ("lora_stack", "loss_curve", "lora_path")
    FUNCTION = "train"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Trains a LoRA on a FLUX.1 model (peft on diffusers' transformer; the loss and file of diffusers' "
                   "train_dreambooth_lora_flux.py) and saves it in models/loras; Cancel saves a checkpoint to "
                   "resume from. lora_stack samples with it at once.")

    def train(self, flux_model, dataset, lora_name: str, steps: int, rank: int, alpha: float, learning_rate: float,
              lr_schedule: str, lr_warmup_steps: int, optimizer: str, batch_size: int, gradient_accumulation: int,
              gradient_checkpointing: bool, fp8_base: bool, timestep_sampling: str, guidance: float,
              lora_layers: str, seed: int, save_every: int, resume_lora: str = NO_RESUME, validation_prompt=None,
              validation_vae=None, validate_every: int = 0, validation_steps: int = 20,
              validation_guidance: float = 3.5):
        node = "FluxWorksTrainLora"
        patcher = host.expect(flux_model, host.FLUX_MODEL, node)
        if not isinstance(dataset, LoraDataset):
            raise TypeError(f"{node} expects a {FLUX_LORA_DATASET} from FluxWorks LoRA Dataset, got "
                            f"{type(dataset).__name__}")
        flux = patcher.model
        if dataset.text_width != flux.config.joint_attention_dim:
            raise ValueError(f"{node}: the dataset was encoded by text encoders of width {dataset.text_width}, but "
                             f"the model reads {flux.config.joint_attention_dim}: encode it with the text encoders "
                             "that belong to this model")
        if optimizer == "adamw8bit" and "adamw8bit" not in optimizer_choices():
            raise ValueError(f"{node}: optimizer adamw8bit needs the bitsandbytes package (pip install "
                             "bitsandbytes); or choose adamw")
        settings = TrainSettings(steps=steps, rank=rank, alpha=float(alpha), learning_rate=float(learning_rate),
                                 lr_schedule=lr_schedule, lr_warmup_steps=lr_warmup_steps, optimizer=optimizer,
                                 batch_size=batch_size, gradient_accumulation=gradient_accumulation,
                                 gradient_checkpointing=bool(gradient_checkpointing),
                                 timestep_sampling=timestep_sampling, guidance=float(guidance),
                                 lora_layers=lora_layers, seed=int(seed) % 2**63)
        settings.check()
        if validate_every and (validation_prompt is None or validation_vae is None):
            raise ValueError(f"{node}: validate_every is {validate_every} but validation_prompt and validation_vae "
                             "are not both connected: connect them, or set validate_every to 0")
        name, path = _lora_path(lora_name)
        if float(alpha) != float(rank):
            logger.warning("%s: alpha %g != rank %d: diffusers and FluxWorks read the scale alpha / rank from the "
                           "file's metadata, but core's LoraLoader does not and applies this LoRA at scale 1 (set "
                           "alpha = rank for files meant for core loaders)", node, alpha, rank)
        resume = None if resume_lora in (None, "", NO_RESUME) else host.full_path("loras", resume_lora)
        if resume is None and os.path.isfile(path):
            logger.warning("%s: %s exists and is overwritten (pick it as resume_lora to continue it instead)", node,
                           path)
        validation = None
        if validate_every:
            from .sampler import flux_conditioning

            validation = flux_conditioning(validation_prompt, "validation_prompt", flux.config.joint_attention_dim)

        device = host.compute_device()
        compute = flux.compute_dtype
        compute_bytes = torch.finfo(compute).bits // 8
        transformer = flux.transformer
        # Checked with the model's own sizes before anything is loaded: a run that cannot fit is refused here.
        memory = check_memory(transformer, dataset.data, settings, device, compute_bytes,
                              host.device_total_memory(device), bool(fp8_base))
        device = host.load_for_training(patcher, memory.total - memory.weights)
        progress = host.training_progress(settings.steps)
        latent_hw = tuple(dataset.data.buckets[0].latents.shape[2:])

        def report(step: StepReport) -> None:
            host.check_interrupt()
            preview = None
            if validation is not None and (step.step % validate_every == 0 or step.step == step.steps):
                x = validation_latent(transformer, flux.config.guidance_embeds, validation.embeds, validation.pooled,
                                      latent_hw, validation_steps, validation_guidance, settings.seed, device,
                                      compute)
                with torch.no_grad():  # the core VAE's weights are inference tensors that require grad
                    image = validation_vae.decode(to_vae_space(x).to(host.intermediate_device()))
                preview = _to_pil(image)
            progress(step.step, f"step {step.step}/{step.steps}  loss {step.loss:.4f}  lr {step.lr:.2e}", preview)
            host.check_interrupt()

        result = run_training(transformer, dataset.data, settings, device, path, compute, resume=resume,
                              fp8_base=bool(fp8_base), save_every=save_every, progress=report)
        curve = torch.from_numpy(np.asarray(loss_curve_image(result.losses), dtype=np.float32) / 255.0)[None]
        text = (f"saved {path} after {result.steps_done} steps; last loss {result.losses[-1]:.4f}"
                if result.losses else f"saved {path}")
        logger.info("%s: %s", node, text)
        # "lora_files": the files this run wrote, for API clients that manage them (not shown by the frontend)
        return {"ui": {"text": [text], "lora_files": [path, state_path(path)]},
                "result": ([(name, 1.0, 1.0)], curve, path)}


def _to_pil(image: torch.Tensor):
    from PIL import Image

    pixels = (image[0, ..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels)


NODE_CLASS_MAPPINGS = {
    "FluxWorksLoraDataset": FluxWorksLoraDataset,
    "FluxWorksTrainLora": FluxWorksTrainLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxWorksLoraDataset": "FluxWorks LoRA Dataset",
    "FluxWorksTrainLora": "FluxWorks Train LoRA",
}
