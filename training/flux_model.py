"""The embedded FLUX.1-architecture transformer: diffusers' `FluxTransformer2DModel` at a tiny width, its
rectified-flow velocity on (B, 16, H, W) latents, and export as a BFL single file.

Head width 128 and RoPE axes (16, 56, 56) are FLUX.1's, so ComfyUI core's UNETLoader accepts the file.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from devtools.tiny_models import diffusers_to_bfl
from fluxworks.flux_models.files import PREVIEW_VAE_KEY
from fluxworks.flux_sampler.latents import make_img_ids, pack, unpack

from .text_encoders import CLIP_WIDTH, T5_WIDTH

FLUX_SETTINGS = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=1, attention_head_dim=128,
    num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def build_flux(seed: int):
    """A fresh transformer with adaLN-Zero initialisation (DiT, Peebles & Xie 2023, sec. 3.2): every
    modulation and the output projection start at zero, so each block starts as the identity."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_SETTINGS)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) or name in (
                    "norm_out.linear", "proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return model


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
             guidance: torch.Tensor) -> torch.Tensor:
    """Predicted velocity (noise - x0) for model-space latents x (B, 16, H, W), as `FluxDenoiser` calls it."""
    b, _, h, w = x.shape
    out = model(
        hidden_states=pack(x), encoder_hidden_states=txt, pooled_projections=pooled, timestep=sigma,
        guidance=guidance, txt_ids=torch.zeros(txt.shape[1], 3, device=x.device),
        img_ids=make_img_ids(h, w, x.device, torch.float32), return_dict=False,
    )[0]
    return unpack(out, h, w)


def export_flux(model, path: str, dtype: torch.dtype = torch.float16, preview_vae: str | None = None) -> str:
    """BFL single-file layout (`double_blocks.*`, `single_blocks.*`, `img_in`, ...) as flux1-dev ships;
    `preview_vae` names the VAE file whose latent space the model was trained in, for the sampler's live previews
    (metadata `PREVIEW_VAE_KEY`)."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {PREVIEW_VAE_KEY: preview_vae} if preview_vae else None
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(state).items()}, path, metadata=metadata)
    return path
