"""The TAESD / taef1 tiny-autoencoder layout (Ollin Boer Bohan's design) whose keys ComfyUI's VAELoader
recognises (`taesd_encoder.*`, `taesd_decoder.*`, `vae_scale`, `vae_shift`)."""

from __future__ import annotations

import torch
from torch import nn


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def encoder(latent_channels: int = 16) -> nn.Sequential:
    def down() -> list[nn.Module]:
        return [_conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64)]

    return nn.Sequential(_conv(3, 64), Block(64, 64), *down(), *down(), *down(), _conv(64, latent_channels))


def decoder(latent_channels: int = 16) -> nn.Sequential:
    def up() -> list[nn.Module]:
        return [Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2),
                _conv(64, 64, bias=False)]

    return nn.Sequential(Clamp(), _conv(latent_channels, 64), nn.ReLU(), *up(), *up(), *up(), Block(64, 64),
                         _conv(64, 3))


class TinyAutoencoder(nn.Module):
    """Encoder/decoder pair mapping images in [-1, 1] to raw 16-channel latents at 1/8 size and back."""

    def __init__(self, latent_channels: int = 16, scale: float = 0.3611, shift: float = 0.1159) -> None:
        super().__init__()
        self.taesd_encoder = encoder(latent_channels)
        self.taesd_decoder = decoder(latent_channels)
        self.register_buffer("vae_scale", torch.tensor(scale))
        self.register_buffer("vae_shift", torch.tensor(shift))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.taesd_encoder(image * 0.5 + 0.5) / self.vae_scale + self.vae_shift

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.taesd_decoder((latent - self.vae_shift) * self.vae_scale).sub(0.5).mul(2)
