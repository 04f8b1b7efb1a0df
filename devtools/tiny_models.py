"""Tiny random FLUX.1-architecture models written in the real file formats people download.

Formats: BFL single file (`flux1-dev.safetensors` layout, optionally under `model.diffusion_model.`),
fp8 (`float8_e4m3fn` matrices as ComfyUI saves them), diffusers folder (`save_pretrained`), ComfyUI-format
T5 and CLIP-L text encoders, and a taef1-layout VAE that core ComfyUI's VAELoader loads.

Usage: python -m devtools.tiny_models MODELS_DIR   (writes a ComfyUI models/ tree)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from fluxworks.flux_models.transformer_keys import bfl_to_diffusers

# Head width 128 and RoPE axes (16, 56, 56) as in FLUX.1. ComfyUI core's loader also assumes 24 heads (width
# 3072), so core nodes need a full-width file (tests/e2e/workflows.py writes a one-block one).
TINY_FLUX = dict(
    num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=2,
    joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(16, 56, 56),
)
TINY_T5 = dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, vocab_size=32128)
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 vocab_size=49408, max_position_embeddings=77)


def random_flux(variant: str = "dev", seed: int = 0, **overrides):
    """A diffusers FluxTransformer2DModel with random weights large enough to give non-trivial outputs."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(guidance_embeds=(variant == "dev"), **{**TINY_FLUX, **overrides})
    with torch.no_grad():  # diffusers zero-inits nothing here, but scale up so every block matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `flux_models.transformer_keys.bfl_to_diffusers` (fuses q/k/v back, swaps norm_out)."""
    out: dict[str, torch.Tensor] = {}
    renames = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    }
    double = {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    }
    single = {"proj_out": "linear2", "attn.norm_q.weight": "norm.query_norm.scale",
              "attn.norm_k.weight": "norm.key_norm.scale", "norm.linear": "modulation.lin"}
    n_double = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")})
    for s in ("weight", "bias"):
        for i in range(n_double):
            p = f"transformer_blocks.{i}.attn."
            out[f"double_blocks.{i}.img_attn.qkv.{s}"] = torch.cat([state[p + n + "." + s] for n in ("to_q", "to_k", "to_v")])
            out[f"double_blocks.{i}.txt_attn.qkv.{s}"] = torch.cat(
                [state[p + n + "." + s] for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
        for i in range(n_single):
            p = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{s}"] = torch.cat(
                [state[p + "attn.to_q." + s], state[p + "attn.to_k." + s], state[p + "attn.to_v." + s],
                 state[p + "proj_mlp." + s]])
        scale, shift = state[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            table = double if parts[0] == "transformer_blocks" else single
            rest = ".".join(parts[2:])
            for src, dst in table.items():
                if rest == src or rest.startswith(src + "."):
                    block = "double_blocks" if parts[0] == "transformer_blocks" else "single_blocks"
                    out[f"{block}.{parts[1]}.{dst}{rest[len(src):]}"] = value
            continue
        for src, dst in renames.items():
            if key.startswith(src + "."):
                out[dst + key[len(src):]] = value
    assert bfl_to_diffusers(out).keys() == state.keys(), "round trip lost keys"
    return out


def write_flux(path: str, model, fmt: str = "bfl") -> str:
    """Save `model` as 'bfl', 'bfl_prefixed' (under model.diffusion_model.), 'fp8', 'fp8_scaled' or 'diffusers'."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "diffusers":
        model.save_pretrained(path, safe_serialization=True)
        return path
    bfl = diffusers_to_bfl(state)
    if fmt == "bfl_prefixed":
        bfl = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    elif fmt == "fp8":
        bfl = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16)) for k, v in bfl.items()}
    elif fmt == "fp8_scaled":
        scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
        for k, v in bfl.items():
            if v.ndim == 2:
                scale = v.abs().max().float() / 448.0
                scaled[k] = (v.float() / scale).to(torch.float8_e4m3fn)
                scaled[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
            else:
                scaled[k] = v
        bfl = scaled
    elif fmt != "bfl":
        raise ValueError(f"unknown format {fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in bfl.items()}, path)
    return path


def random_text_encoders(seed: int = 0):
    """(T5EncoderModel, CLIPTextModel) with tiny random weights and the real vocabularies."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 tie_word_embeddings=False, **TINY_T5)).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", projection_dim=64, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407, **TINY_CLIP)).eval()
    return t5, clip


def write_text_encoders(folder: str, t5, clip, fp8_t5: bool = False) -> tuple[str, str]:
    """Save in ComfyUI's layouts: `t5xxl_*.safetensors` (encoder.* + shared.weight) and `clip_l.safetensors`."""
    os.makedirs(folder, exist_ok=True)
    t5_state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if fp8_t5:
        t5_state = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and "shared" not in k and "relative" not in k
                    else v for k, v in t5_state.items()}
    clip_state = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous()
                  for k, v in clip.state_dict().items()}
    clip_state["text_projection.weight"] = torch.eye(clip.config.hidden_size)
    name = "t5xxl_tiny_fp8_e4m3fn.safetensors" if fp8_t5 else "t5xxl_tiny.safetensors"
    t5_path, clip_path = os.path.join(folder, name), os.path.join(folder, "clip_l_tiny.safetensors")
    save_file(t5_state, t5_path)
    save_file(clip_state, clip_path)
    return t5_path, clip_path


def write_vae(path: str, seed: int = 0) -> str:
    """A random taef1-layout autoencoder in one file, loadable by core ComfyUI's VAELoader."""
    from .taesd_arch import TinyAutoencoder

    torch.manual_seed(seed)
    vae = TinyAutoencoder()
    with torch.no_grad():  # PyTorch's default conv init shrinks activations to ~0 over 40 layers: keep them alive
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                module.weight.mul_(0.7)
                if module.bias is not None:
                    module.bias.zero_()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path)
    return path


def write_models_tree(models_dir: str, seed: int = 0) -> dict[str, str]:
    """A ComfyUI `models/` tree with every tiny file the tests and the demo use; returns their names."""
    dm = os.path.join(models_dir, "diffusion_models")
    dev, schnell = random_flux("dev", seed), random_flux("schnell", seed + 1)
    names = {
        "dev": os.path.basename(write_flux(os.path.join(dm, "flux1-dev-tiny.safetensors"), dev)),
        "schnell": os.path.basename(write_flux(os.path.join(dm, "flux1-schnell-tiny.safetensors"), schnell)),
        "dev_fp8": os.path.basename(write_flux(os.path.join(dm, "flux1-dev-tiny-fp8.safetensors"), dev, "fp8")),
    }
    write_flux(os.path.join(dm, "flux1-dev-tiny-diffusers"), dev, "diffusers")
    names["dev_diffusers"] = "flux1-dev-tiny-diffusers"
    t5, clip = random_text_encoders(seed)
    t5_path, clip_path = write_text_encoders(os.path.join(models_dir, "text_encoders"), t5, clip)
    names["t5"], names["clip_l"] = os.path.basename(t5_path), os.path.basename(clip_path)
    names["vae"] = os.path.basename(write_vae(os.path.join(models_dir, "vae", "taef1_tiny.safetensors"), seed))
    return names


def tree_main(description: str, write_tree: Callable[[str, int], dict[str, str]]) -> None:
    """Command line shared by the tree writers: `models_dir [--seed N]`, then one "role: file" line each."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("models_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for role, name in write_tree(args.models_dir, args.seed).items():
        print(f"{role}: {name}")  # noqa: T201


def main() -> None:
    tree_main(__doc__.splitlines()[0], write_models_tree)


if __name__ == "__main__":
    main()
