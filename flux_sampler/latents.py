"""Latent layout helpers: FLUX.1 sees a (B, 16, H, W) latent as a sequence of 2x2 patches with 3-axis
position ids (BFL `prepare`, diffusers `_pack_latents` / `_prepare_latent_image_ids`)."""

from __future__ import annotations

import torch

# FLUX.1 autoencoder latent statistics (BFL `ae.py` AutoEncoderParams; ComfyUI `latent_formats.Flux`).
LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159
LATENT_CHANNELS = 16


def to_model_space(latent: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent (ComfyUI LATENT) -> the normalised space the transformer works in."""
    return (latent - LATENT_SHIFT) * LATENT_SCALE


def to_vae_space(x: torch.Tensor) -> torch.Tensor:
    """Model-space latent -> raw VAE latent that ComfyUI's VAEDecode expects."""
    return x / LATENT_SCALE + LATENT_SHIFT


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): one token per 2x2 patch."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack` for a latent of `height` x `width`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def make_img_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) RoPE position ids of the image tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def make_noise(shape: tuple[int, ...] | torch.Size, seed: int) -> torch.Tensor:
    """Gaussian noise for a whole latent batch from one CPU generator, as ComfyUI's `prepare_noise` and
    diffusers' `randn_tensor` (CPU generator) draw it: each batch item gets distinct noise."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_latent(latent: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward process x_t = sigma * noise + (1 - sigma) * x_0."""
    return sigma * noise + (1.0 - sigma) * latent
