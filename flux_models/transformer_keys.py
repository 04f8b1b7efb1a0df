"""BFL (and ComfyUI) FLUX.1 transformer keys -> diffusers `FluxTransformer2DModel` keys, for any width.

diffusers' own single-file converter assumes width 3072; here every split size comes from the tensors.
"""

from __future__ import annotations

import re

import torch

# Prefixes under which FLUX.1 transformer weights appear in single files (full checkpoints, ComfyUI saves).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")

BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.to_q.weight"

_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_SINGLE_RENAMES = {
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "modulation.lin": "norm.linear",
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a common checkpoint prefix when the transformer's keys sit under one."""
    for prefix in KNOWN_PREFIXES:
        if any(k.startswith(prefix) and (BFL_MARKER in k or DIFFUSERS_MARKER in k) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'bfl' or 'diffusers', or '' when these are not FLUX.1 transformer weights."""
    if BFL_MARKER in state and "img_in.weight" in state:
        return "bfl"
    if DIFFUSERS_MARKER in state and "x_embedder.weight" in state:
        return "diffusers"
    return ""


def _split(key: str, tensor: torch.Tensor, sizes: list[int], what: str) -> list[torch.Tensor]:
    """Rows of a fused tensor; a wrong row count raises ValueError naming the key and the expected sizes instead
    of torch's `split_with_sizes` error."""
    if tensor.ndim == 0 or tensor.shape[0] != sum(sizes) or min(sizes) <= 0:
        rows = tensor.shape[0] if tensor.ndim else 0
        raise ValueError(f"'{key}' has shape {tuple(tensor.shape)}, but {what} needs {sum(sizes)} rows "
                         f"({' + '.join(map(str, sizes))}) for the hidden width {sizes[0]} read from "
                         f"'img_in.weight'; got {rows}: the file is damaged or mixes models of two sizes")
    return list(torch.split(tensor, sizes, dim=0))


def _rename(table: dict[str, str], rest: str) -> str | None:
    for src, dst in table.items():
        if rest == src:
            return dst
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL-layout state dict; raises ValueError naming any key it does not know."""
    hidden = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        block = _BLOCK.match(key)
        if block is None:
            if key.startswith("final_layer.adaLN_modulation.1."):
                shift, scale = value.chunk(2, dim=0)  # BFL (shift, scale) vs diffusers (scale, shift)
                out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
                continue
            name = _rename(_RENAMES, key)
            if name is None:
                unknown.append(key)
            else:
                out[name] = value
            continue
        kind, index, rest = block.groups()
        if kind == "double_blocks":
            base = f"transformer_blocks.{index}."
            if rest.startswith(("img_attn.qkv.", "txt_attn.qkv.")):
                suffix = rest.rsplit(".", 1)[1]
                names = ("to_q", "to_k", "to_v") if rest.startswith("img") else (
                    "add_q_proj", "add_k_proj", "add_v_proj")
                for name, part in zip(names, _split(key, value, [hidden] * 3, "a fused q/k/v"), strict=True):
                    out[f"{base}attn.{name}.{suffix}"] = part
                continue
            name = _rename(_DOUBLE_RENAMES, rest)
        else:
            base = f"single_transformer_blocks.{index}."
            if rest.startswith("linear1."):
                suffix = rest.rsplit(".", 1)[1]
                mlp = 4 * hidden  # FLUX.1's MLP ratio (infer_config checks it on the double blocks too)
                q, k, v, m = _split(key, value, [hidden, hidden, hidden, mlp], "a fused q/k/v + MLP input")
                out[f"{base}attn.to_q.{suffix}"] = q
                out[f"{base}attn.to_k.{suffix}"] = k
                out[f"{base}attn.to_v.{suffix}"] = v
                out[f"{base}proj_mlp.{suffix}"] = m
                continue
            name = _rename(_SINGLE_RENAMES, rest)
        if name is None:
            unknown.append(key)
        else:
            out[base + name] = value
    if unknown:
        shown = ", ".join(unknown[:8])
        raise ValueError(f"unexpected FLUX.1 keys ({len(unknown)}): {shown}")
    return out
