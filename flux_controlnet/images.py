"""Fitting control images and masks to the output: center-crop to the output's aspect ratio, then resize
(area averaging when shrinking, bilinear when enlarging). Masks end as per-token weights, soft edges kept."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..flux_sampler.latents import pack


def _center_crop_box(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the largest centered box with the target's aspect ratio."""
    if width * target_h > height * target_w:  # too wide: crop the sides
        w = max(1, round(height * target_w / target_h))
        return 0, (width - w) // 2, height, w
    h = max(1, round(width * target_h / target_w))
    return (height - h) // 2, 0, h, width


def _fit_channels_first(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, height, width): center crop to the aspect ratio, then resize."""
    top, left, h, w = _center_crop_box(x.shape[2], x.shape[3], height, width)
    x = x[:, :, top:top + h, left:left + w]
    if (h, w) == (height, width):
        return x
    if h >= height and w >= width:
        return F.interpolate(x, size=(height, width), mode="area")
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) fitted to `height` x `width` pixels (see the module docstring)."""
    if image.ndim != 4:
        raise ValueError(f"a control image must be an IMAGE of shape (batch, height, width, channels), "
                         f"got {tuple(image.shape)}")
    return _fit_channels_first(image.movedim(-1, 1).float(), height, width).movedim(1, -1)


def pixel_cond(image: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W) in [-1, 1], what pixel-input ControlNets read."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return rgb.movedim(-1, 1) * 2.0 - 1.0


def mask_to_tokens(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """A ComfyUI MASK (B, H, W) or (H, W) in [0, 1] -> per-token weights (B, L, 1) for a latent of
    `latent_height` x `latent_width` (one token per 2x2 latent patch = 16x16 pixels, row-major as `pack`).

    Each token gets the mean of the mask over its patch, so a token wholly outside the mask weighs exactly 0,
    one wholly inside exactly 1, and soft or partly covered edges something in between.
    """
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"a mask must have shape (batch, height, width), got {tuple(mask.shape)}")
    rows, cols = latent_height // 2, latent_width // 2
    pixels = _fit_channels_first(mask[:, None].float(), latent_height * 8, latent_width * 8)
    tokens = F.adaptive_avg_pool2d(pixels, (rows, cols)).clamp(0.0, 1.0)  # (B, 1, rows, cols)
    return tokens.flatten(2).transpose(1, 2)


def control_inputs(latent_input: bool, image: torch.Tensor, mask: torch.Tensor | None, latent_height: int,
                   latent_width: int, encode: Callable[[torch.Tensor], torch.Tensor] | None):
    """(ControlNet input, token weights or None) for an IMAGE and optional MASK, fitted to a latent of this size.

    Latent-input nets get the packed model-space latent of the fitted image (`encode`: IMAGE -> (B, 16, h, w)
    model-space latent); pixel-input nets get the fitted image in [-1, 1].
    """
    fitted = fit_image(image, latent_height * 8, latent_width * 8)
    if latent_input:
        if encode is None:
            raise ValueError("this ControlNet reads the VAE-encoded control image, but no VAE was given")
        cond = pack(encode(fitted))
    else:
        cond = pixel_cond(fitted)
    return cond, None if mask is None else mask_to_tokens(mask, latent_height, latent_width)
