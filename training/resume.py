"""Continue training from exported files: the four files are the checkpoint, so a long training can be split
over several runs (each device command is time-limited) and every run leaves usable files behind."""

from __future__ import annotations

import os

import torch

from devtools.taesd_arch import TinyAutoencoder
from fluxworks.flux_models.files import load_safetensors
from fluxworks.flux_models.transformer import state_dict_from_path


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str,
                 allowed_missing: tuple[str, ...] = ()) -> None:
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing:
        raise ValueError(f"{path} does not fit {type(module).__name__}: missing {missing[:6]}")


def load_flux_weights(model: torch.nn.Module, path: str) -> None:
    """BFL single file -> the diffusers transformer being trained (every key must be present)."""
    state, _ = state_dict_from_path(path)
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ValueError(f"{path} has keys the training transformer lacks: {unexpected[:6]}")
    _load_strict(model, state, path)


def load_text_weights(t5: torch.nn.Module, clip: torch.nn.Module, t5_path: str, clip_path: str) -> None:
    """ComfyUI-layout T5 / CLIP-L files -> the text towers being trained."""
    _load_strict(t5, load_safetensors(t5_path), t5_path, allowed_missing=("encoder.embed_tokens.weight",))
    clip_state = {k: v for k, v in load_safetensors(clip_path).items() if k != "text_projection.weight"}
    if not any(k.startswith("text_model.") for k in clip.state_dict()):
        clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    _load_strict(clip, clip_state, clip_path, allowed_missing=("text_model.embeddings.position_ids",
                                                               "embeddings.position_ids"))


def load_autoencoder_weights(path: str, device: torch.device) -> TinyAutoencoder:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no autoencoder to continue from at {path}")
    vae = TinyAutoencoder()
    _load_strict(vae, load_safetensors(path), path)
    return vae.to(device).eval().requires_grad_(False)
