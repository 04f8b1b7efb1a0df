"""Tiny random Flux ControlNets in the real file formats: InstantX/Shakker (diffusers single file or folder),
Union (with a mode embedder), XLabs (BFL-layout trunk, pixel hint encoder) and MistoLine; plus a tiny BFL
structural model (FLUX.1-Canny-dev layout: 128-channel `img_in`) and a tiny transformers depth model.
Widths match devtools.tiny_models.

Usage: python -m devtools.tiny_controlnets MODELS_DIR   (adds controlnet/ files and a structural model)
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from devtools.tiny_models import TINY_FLUX, diffusers_to_bfl, random_flux, tree_main, write_flux
from fluxworks.flux_controlnet.model import ControlNetConfig, build_controlnet

KINDS = ("instantx", "union", "xlabs", "mistoline")
UNION_NUM_MODES = 10  # InstantX Union and Shakker Union-Pro embed 10 modes (7 used for FLUX.1)
_CONTROL_PREFIXES = ("controlnet_", "input_hint_block.")


def tiny_config(kind: str = "instantx", num_layers: int = 1, num_single_layers: int = 1,
                guidance_embeds: bool = True) -> ControlNetConfig:
    return ControlNetConfig(
        kind=kind, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=TINY_FLUX["attention_head_dim"], num_attention_heads=TINY_FLUX["num_attention_heads"],
        joint_attention_dim=TINY_FLUX["joint_attention_dim"], pooled_projection_dim=TINY_FLUX["pooled_projection_dim"],
        guidance_embeds=guidance_embeds, axes_dims_rope=TINY_FLUX["axes_dims_rope"],
        num_mode=UNION_NUM_MODES if kind == "union" else None,
    )


def random_controlnet(kind: str = "instantx", seed: int = 0, **config_overrides):
    """A diffusers FluxControlNetModel of `kind` with random weights; the zero-initialised projections get
    noise too, so the residuals are not zero."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    model = build_controlnet(tiny_config(kind, **config_overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _bfl_trunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer part of a diffusers-layout ControlNet in BFL keys. `diffusers_to_bfl` expects a final
    layer, which ControlNets lack: a placeholder goes in and its BFL key comes out again."""
    trunk = {k: v for k, v in state.items() if not k.startswith(_CONTROL_PREFIXES)}
    width = state["x_embedder.weight"].shape[0]
    trunk["norm_out.linear.weight"] = torch.zeros(2 * width, width)
    trunk["norm_out.linear.bias"] = torch.zeros(2 * width)
    return {k: v for k, v in diffusers_to_bfl(trunk).items() if not k.startswith("final_layer.")}


def to_xlabs_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hint = {"conv_in": 0, "conv_out": 14, **{f"blocks.{i}": 2 * (i + 1) for i in range(6)}}
    out = _bfl_trunk(state)
    for key, value in state.items():
        if key.startswith("controlnet_x_embedder."):
            out["pos_embed_input." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("controlnet_blocks."):
            out[key] = value
        elif key.startswith("input_hint_block."):
            layer, param = key[len("input_hint_block."):].rsplit(".", 1)
            out[f"input_hint_block.{hint[layer]}.{param}"] = value
    return out


def to_mistoline_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _bfl_trunk(state)
    for key, value in state.items():
        if key.startswith("controlnet_x_embedder."):
            out["pos_embed_input." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("controlnet_blocks.", "controlnet_single_blocks.")):
            name, index, _, param = key.split(".")
            prefix = "controlnet_blocks" if name == "controlnet_blocks" else "single_controlnet_blocks"
            out[f"{prefix}.{index}.linear.{param}"] = value
        elif key.startswith("input_hint_block."):
            out["input_cond_block." + key[len("input_hint_block."):]] = value
    return out


def write_controlnet(path: str, model, fmt: str) -> str:
    """Save as 'diffusers' (one file), 'diffusers_folder' (save_pretrained), 'xlabs' or 'mistoline'."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "diffusers_folder":
        model.save_pretrained(path, safe_serialization=True)
        return path
    if fmt == "xlabs":
        state = to_xlabs_keys(state)
    elif fmt == "mistoline":
        state = to_mistoline_keys(state)
    elif fmt != "diffusers":
        raise ValueError(f"unknown ControlNet format {fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def random_structural_flux(seed: int = 0):
    """A tiny FLUX.1-Canny/Depth-dev-style transformer: 128 input channels (noise + control latent), 64 out."""
    return random_flux("dev", seed, in_channels=128, out_channels=64)


def write_depth_model(folder: str, seed: int = 0) -> str:
    """A tiny random Depth Anything (transformers) with its image processor, as `save_pretrained` writes them."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def write_controlnets_tree(models_dir: str, seed: int = 0) -> dict[str, str]:
    """Tiny ControlNets of every format under `models_dir/controlnet`, and a structural model under
    `models_dir/diffusion_models`; returns role -> name as the loaders list them."""
    folder = os.path.join(models_dir, "controlnet")
    files = {
        "controlnet_canny": ("flux-controlnet-canny-tiny.safetensors", "instantx", "diffusers", {}),
        "controlnet_union": ("flux-controlnet-union-tiny.safetensors", "union", "diffusers",
                             {"num_single_layers": 0}),
        "controlnet_folder": ("flux-controlnet-depth-tiny-diffusers", "instantx", "diffusers_folder", {}),
        "controlnet_xlabs": ("flux-canny-controlnet-v3-tiny.safetensors", "xlabs", "xlabs", {"num_single_layers": 0}),
        "controlnet_mistoline": ("mistoline-flux-tiny.safetensors", "mistoline", "mistoline", {}),
    }
    names = {}
    for offset, (role, (name, kind, fmt, overrides)) in enumerate(files.items()):
        write_controlnet(os.path.join(folder, name), random_controlnet(kind, seed + offset, **overrides), fmt)
        names[role] = name
    structural = os.path.join(models_dir, "diffusion_models", "flux1-canny-dev-tiny.safetensors")
    names["structural"] = os.path.basename(write_flux(structural, random_structural_flux(seed)))
    return names


def main() -> None:
    tree_main(__doc__.splitlines()[0], write_controlnets_tree)


if __name__ == "__main__":
    main()
