"""Which Flux ControlNet format a state dict is in, and its conversion to diffusers `FluxControlNetModel` keys.

Formats (the keys that identify them are facts of the published files; ComfyUI's `comfy/controlnet.py`
detects them the same way):
- "instantx": diffusers layout (`controlnet_x_embedder.weight`); InstantX / Shakker canny, depth, Union-Pro 2.0;
- "union": the same with `controlnet_mode_embedder.weight` (InstantX / Shakker Union, Union-Pro);
- "xlabs": BFL layout trunk + `controlnet_blocks.N.weight` + a pixel `input_hint_block` (XLabs canny/depth/hed);
- "mistoline": BFL layout trunk + `controlnet_blocks.N.linear.*` + a pixel `input_cond_block` (MistoLine).
"""

from __future__ import annotations

import re

import torch

from ..flux_models.transformer_keys import bfl_to_diffusers

FORMATS = ("instantx", "union", "xlabs", "mistoline")

# XLabs' `input_hint_block` is an nn.Sequential of 8 convolutions with SiLU between them (indices 0, 2, ... 14);
# diffusers' `ControlNetConditioningEmbedding` with four 16-channel levels has the same convolutions.
_XLABS_HINT = {0: "conv_in", 14: "conv_out", **{2 * (i + 1): f"blocks.{i}" for i in range(6)}}

_NOT_A_CONTROLNET = (
    ("img_in.lora_A.weight", "a BFL Canny/Depth control LoRA: apply it with a LoRA node on FLUX.1-dev"),
    ("lora_", "a LoRA: load it with a LoRA node"),
    ("final_layer.linear.weight", "a FLUX.1 transformer: load it with FluxWorksModelLoader (BFL's FLUX.1-Canny-dev "
                                  "and Depth-dev full models go there too, with FluxWorksStructuralControl)"),
    ("proj_out.weight", "a FLUX.1 transformer in diffusers layout: load it with FluxWorksModelLoader"),
    ("pos_embed_input.proj.weight", "an SD3 ControlNet, which does not fit FLUX.1"),
    ("controlnet_cond_embedding.conv_in.weight", "an SD1.5/SDXL ControlNet, which does not fit FLUX.1"),
    ("zero_convs.0.0.weight", "an SD1.5/SDXL ControlNet, which does not fit FLUX.1"),
    ("decoder.conv_in.weight", "a VAE (it belongs in models/vae)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder (it belongs in models/text_encoders)"),
    ("text_model.encoder.layers.0.mlp.fc1.weight", "a CLIP text encoder (it belongs in models/text_encoders)"),
)

EXPECTED = ("expected a Flux ControlNet: InstantX/Shakker/Union (diffusers keys such as 'controlnet_x_embedder.weight'), "
            "XLabs ('controlnet_blocks.0.weight' with 'double_blocks.0.img_attn.qkv.weight') or MistoLine "
            "('controlnet_blocks.0.linear.weight')")


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """One of FORMATS, or '' when the keys match none of them."""
    if "controlnet_x_embedder.weight" in state and "x_embedder.weight" in state:
        return "union" if "controlnet_mode_embedder.weight" in state else "instantx"
    if "controlnet_blocks.0.linear.weight" in state and "img_in.weight" in state:
        return "mistoline"
    if "controlnet_blocks.0.weight" in state and "double_blocks.0.img_attn.qkv.weight" in state:
        return "xlabs"
    return ""


def describe_non_controlnet(state: dict[str, torch.Tensor]) -> str:
    """A hint about what a file that is not a Flux ControlNet actually holds."""
    keys = list(state)
    for needle, what in _NOT_A_CONTROLNET:
        if any(needle in k for k in keys[:5000]):
            return f"it looks like {what}"
    return "its first keys are " + ", ".join(keys[:5])


def _split_control_keys(state: dict[str, torch.Tensor], control_prefixes: tuple[str, ...]):
    control = {k: v for k, v in state.items() if k.startswith(control_prefixes)}
    trunk = {k: v for k, v in state.items() if not k.startswith(control_prefixes)}
    return control, trunk


def _rename_prefix(key: str, old: str, new: str) -> str:
    return new + key[len(old):]


def xlabs_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs BFL-layout ControlNet -> diffusers `FluxControlNetModel` (with its XLabs-style hint encoder)."""
    control, trunk = _split_control_keys(state, ("controlnet_blocks.", "pos_embed_input.", "input_hint_block."))
    out = bfl_to_diffusers(trunk)
    hint = re.compile(r"^input_hint_block\.(\d+)\.(weight|bias)$")
    for key, value in control.items():
        if key.startswith("pos_embed_input."):
            out[_rename_prefix(key, "pos_embed_input.", "controlnet_x_embedder.")] = value
        elif key.startswith("controlnet_blocks."):
            out[key] = value
        else:
            match = hint.match(key)
            if match is None or int(match.group(1)) not in _XLABS_HINT:
                raise ValueError(f"unexpected XLabs ControlNet key {key!r}: the hint encoder has convolutions "
                                 f"at indices {sorted(_XLABS_HINT)}")
            out[f"input_hint_block.{_XLABS_HINT[int(match.group(1))]}.{match.group(2)}"] = value
    return out


def mistoline_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MistoLine BFL-layout ControlNet -> `FluxControlNetModel` keys, where each control block is a
    Sequential(Linear, SiLU) and `input_hint_block` is `MistolineHintEncoder` (see model.py)."""
    prefixes = ("controlnet_blocks.", "single_controlnet_blocks.", "pos_embed_input.", "input_cond_block.")
    control, trunk = _split_control_keys(state, prefixes)
    out = bfl_to_diffusers(trunk)
    block = re.compile(r"^(controlnet_blocks|single_controlnet_blocks)\.(\d+)\.linear\.(weight|bias)$")
    for key, value in control.items():
        if key.startswith("pos_embed_input."):
            out[_rename_prefix(key, "pos_embed_input.", "controlnet_x_embedder.")] = value
        elif key.startswith("input_cond_block."):
            out[_rename_prefix(key, "input_cond_block.", "input_hint_block.")] = value
        else:
            match = block.match(key)
            if match is None:
                raise ValueError(f"unexpected MistoLine ControlNet key {key!r}")
            kind, index, param = match.groups()
            name = "controlnet_blocks" if kind == "controlnet_blocks" else "controlnet_single_blocks"
            out[f"{name}.{index}.0.{param}"] = value
    return out


def to_diffusers(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Diffusers-layout keys for a state dict of format `fmt` (see FORMATS)."""
    if fmt in ("instantx", "union"):
        return state
    if fmt == "xlabs":
        return xlabs_to_diffusers(state)
    if fmt == "mistoline":
        return mistoline_to_diffusers(state)
    raise ValueError(f"unknown Flux ControlNet format {fmt!r}; expected one of {FORMATS}")
