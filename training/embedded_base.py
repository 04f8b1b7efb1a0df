"""The shipped embedded model, frozen, as the base the example LoRA and the example ControlNet are trained on.

Both adapters are trained against the files users get (`embedded_model/`), loaded by the loaders the FluxWorks
nodes use (`evaluation.embedded.EmbeddedPipeline`), so what is trained on is exactly what ComfyUI runs: text
is encoded as FluxWorks Text Encode encodes it at the recommended T5 length, images as core VAE Encode does
with the embedded taef1 VAE (whose encoder output is the model-space latent), and the loss is the rectified
flow objective of `training.diffusion` (x_t = sigma * noise + (1 - sigma) * x0, target noise - x0, sigma
logit-normal with the sampler's resolution shift).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.embedded import EMBEDDED_DIR, RECOMMENDED_GUIDANCE, RECOMMENDED_T5_LENGTH, EmbeddedPipeline
from fluxworks.flux_sampler.latents import make_img_ids, pack, unpack

from .autoencoder import encode_images
from .diffusion import sample_sigmas

logger = logging.getLogger(__name__)


def load_base(tokenizer_folders: tuple[str, str], device: str = "cpu", folder: str = EMBEDDED_DIR) -> EmbeddedPipeline:
    """The shipped embedded model in float32 with every weight frozen."""
    pipeline = EmbeddedPipeline.load(tokenizer_folders, folder, device)
    for module in (pipeline.transformer, pipeline.t5, pipeline.clip, pipeline.vae):
        module.eval().requires_grad_(False)
    return pipeline


@torch.no_grad()
def image_latents(pipeline: EmbeddedPipeline, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Model-space latents (N, 16, H/8, W/8) float32 of (N, H, W, 3) uint8 images, as VAE Encode gives them."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(pipeline.device)
    return encode_images(pipeline.vae, tensor, batch).float()


@dataclass
class TextTable:
    """Encoded captions, each distinct caption encoded once: `index[i]` is caption i's row in the tensors."""

    embeds: torch.Tensor  # (U, L, 64) T5 token embeddings
    pooled: torch.Tensor  # (U, 64) CLIP-L pooled
    index: torch.Tensor  # (N,) long

    def rows(self, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.index[which]
        return self.embeds[rows], self.pooled[rows]


@torch.no_grad()
def encode_captions(pipeline: EmbeddedPipeline, captions: list[str], length: int = RECOMMENDED_T5_LENGTH,
                    batch: int = 64) -> TextTable:
    """Every caption encoded as FluxWorks Text Encode encodes it (T5 at `length` tokens, CLIP-L pooled)."""
    distinct = sorted(set(captions))
    where = {caption: i for i, caption in enumerate(distinct)}
    parts = [pipeline.encode(distinct[i:i + batch], length) for i in range(0, len(distinct), batch)]
    embeds = torch.cat([p.embeds for p in parts]).float()
    pooled = torch.cat([p.pooled for p in parts]).float()
    index = torch.tensor([where[c] for c in captions], dtype=torch.long, device=embeds.device)
    return TextTable(embeds, pooled, index)


def transformer_inputs(x: torch.Tensor, sigma: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
                       guidance: float = RECOMMENDED_GUIDANCE) -> dict[str, torch.Tensor]:
    """Diffusers keyword inputs of one evaluation on (B, 16, H, W) latents, as the FluxWorks sampler builds them
    (sigma as the timestep, the distilled guidance value as it is)."""
    b, _, h, w = x.shape
    return dict(hidden_states=pack(x), encoder_hidden_states=txt, pooled_projections=pooled, timestep=sigma,
                guidance=torch.full((b,), guidance, device=x.device),
                txt_ids=torch.zeros(txt.shape[1], 3, device=x.device), img_ids=make_img_ids(h, w, x.device, torch.float32))


def noised(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, sigma, target velocity noise - x0) for clean latents x0 (B, 16, H, W)."""
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    sigma = sample_sigmas(x0.shape[0], tuple(x0.shape[2:]), generator, x0.device)
    s = sigma[:, None, None, None]
    return s * noise + (1 - s) * x0, sigma, noise - x0


def flow_loss(transformer: torch.nn.Module, x0: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
              generator: torch.Generator, controlnet: torch.nn.Module | None = None,
              control: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow MSE of `transformer` (with `controlnet` residuals from the packed `control` latent when
    given) on a batch of clean latents."""
    xt, sigma, target = noised(x0, generator)
    inputs = transformer_inputs(xt, sigma, txt, pooled)
    residuals = {}
    if controlnet is not None:
        double, single = controlnet(**inputs, controlnet_cond=control, conditioning_scale=1.0, return_dict=False)
        residuals = {"controlnet_block_samples": double, "controlnet_single_block_samples": single}
    out = transformer(**inputs, **residuals, return_dict=False)[0]
    return F.mse_loss(unpack(out, *x0.shape[2:]), target)


def size_of(path: str) -> str:
    return f"{os.path.getsize(path):,} bytes"
