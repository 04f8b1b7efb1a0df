"""Training the taef1-layout autoencoder (16 latent channels, 8x downsampling) on the shapes images.

The encoder's output *is* the transformer's model-space latent (core's TAESD: raw = enc / vae_scale +
vae_shift, and FLUX.1's model space is (raw - shift) * scale), so training keeps it near zero mean and unit
spread, and decodes it with a little Gaussian noise added: the decoder then tolerates the small errors a
diffusion model leaves, and nearby latents decode to nearby images.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from devtools.taesd_arch import TinyAutoencoder

from .stage import StageClock, cosine_lr

logger = logging.getLogger(__name__)

LATENT_NOISE = 0.1  # std of the noise added to latents before decoding, against a latent std of 1
STATS_WEIGHT = 0.1  # weight of the zero-mean / unit-std penalty on the latents


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] (what the taesd encoder/decoder work in)."""
    return images_uint8.permute(0, 3, 1, 2).float().div(255.0)


def autoencoder_loss(vae: TinyAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + MSE reconstruction from noised latents, plus the latent statistics penalty."""
    z = vae.taesd_encoder(x)
    decoded = vae.taesd_decoder(z + LATENT_NOISE * torch.randn_like(z))
    l1 = F.l1_loss(decoded.float(), x)
    mse = F.mse_loss(decoded.float(), x)
    zf = z.float()
    stats = (zf.std() - 1.0) ** 2 + zf.mean(dim=(0, 2, 3)).pow(2).mean()
    loss = l1 + mse + STATS_WEIGHT * stats
    return loss, {"l1": l1.item(), "mse": mse.item(), "z_std": zf.std().item()}


def train_autoencoder(images: torch.Tensor, steps: int, batch: int, lr: float, seed: int, device: torch.device,
                      deadline: float, log_every: int = 100) -> TinyAutoencoder:
    """Train on `images` ((N, 128, 128, 3) uint8, on `device`) for `steps`, or until `deadline`."""
    torch.manual_seed(seed)
    vae = TinyAutoencoder().to(device).to(memory_format=torch.channels_last)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    clock = StageClock(steps, deadline)
    step = 0
    while not clock.done(step):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(clock.effective_step(step), steps, lr, warmup=min(200, steps // 10 + 1))
        index = torch.randint(0, len(images), (batch,), device=device, generator=generator)
        x = to_unit(images[index]).contiguous(memory_format=torch.channels_last)
        with autocast:
            loss, stats = autoencoder_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0:
            logger.info("autoencoder step %d/%d loss %.4f l1 %.4f mse %.5f z_std %.3f (%.1f s)", step, steps,
                        loss.item(), stats["l1"], stats["mse"], stats["z_std"], clock.elapsed())
        step += 1
    logger.info("autoencoder: %d of %d steps in %.1f s%s", step, steps, clock.elapsed(),
                "" if step >= steps else " (stopped by the time limit)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: TinyAutoencoder, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Model-space latents (N, 16, H/8, W/8) float16 of uint8 images (the encoder output itself)."""
    out = []
    for i in range(0, len(images), batch):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            out.append(vae.taesd_encoder(to_unit(images[i:i + batch])).to(torch.float16))
    return torch.cat(out)


def export_autoencoder(vae: TinyAutoencoder, path: str, dtype: torch.dtype = torch.float16) -> str:
    """One file with `taesd_encoder.*`, `taesd_decoder.*`, `vae_scale`, `vae_shift`: core's VAELoader reads it
    as a taef1-style TAESD with 16 latent channels."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().to(dtype if v.ndim else torch.float32).contiguous() for k, v in vae.state_dict().items()}
    save_file(state, path)
    return path
