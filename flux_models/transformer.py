"""Build a diffusers `FluxTransformer2DModel` from a FLUX.1 file or folder, config inferred from weights."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from . import files
from .dtypes import dequantize_scaled_fp8, is_fp8, storage_and_compute
from .fp8_storage import keep_linear_weights_in
from .transformer_keys import bfl_to_diffusers, detect_layout, strip_prefix

logger = logging.getLogger(__name__)

FLUX1_AXES = (16, 56, 56)


@dataclass(frozen=True)
class FluxConfig:
    """What the weights say about the model: sizes, depth, and dev (guidance-distilled) vs schnell."""

    in_channels: int
    out_channels: int
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    axes_dims_rope: tuple[int, int, int]

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embeds else "schnell"

    def diffusers_kwargs(self) -> dict:
        return {
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": self.axes_dims_rope,
        }


def count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix<N>.` the weights hold (one past the highest index)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _axes_for(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1 splits a 128-wide head into RoPE axes (16, 56, 56); other widths keep those proportions."""
    if head_dim == 128:
        return FLUX1_AXES
    first = head_dim // 8
    rest = (head_dim - first) // 2
    if first % 2 or rest % 2 or first + 2 * rest != head_dim:
        raise ValueError(f"cannot derive RoPE axes for attention head width {head_dim}")
    return (first, rest, rest)


def infer_config(state: dict[str, torch.Tensor], axes: tuple[int, int, int] | None = None) -> FluxConfig:
    """Read a FluxConfig from diffusers-layout weights (shapes and key names only)."""
    try:
        hidden, in_channels = state["x_embedder.weight"].shape
        out_channels = state["proj_out.weight"].shape[0]
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        joint_dim = state["context_embedder.weight"].shape[1]
        pooled_dim = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
        mlp_hidden = state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"FLUX.1 weights are missing the key {exc.args[0]!r}") from exc
    if mlp_hidden != 4 * hidden:
        raise ValueError(f"MLP width {mlp_hidden} is not 4x the hidden width {hidden}: not a FLUX.1 model")
    return FluxConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        **backbone_fields(state, hidden, head_dim, joint_dim, pooled_dim),
        axes_dims_rope=tuple(axes) if axes else _axes_for(head_dim),
    )


def backbone_fields(state: dict[str, torch.Tensor], hidden: int, head_dim: int, joint_dim: int,
                    pooled_dim: int) -> dict:
    """The geometry a FLUX.1 transformer and its ControlNets read alike from diffusers-layout weights: block
    counts, heads, text widths and whether there is a guidance embedding."""
    if hidden % head_dim:
        raise ValueError(f"hidden width {hidden} is not a multiple of the head width {head_dim}")
    return {
        "num_layers": count_blocks(state, "transformer_blocks."),
        "num_single_layers": count_blocks(state, "single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": joint_dim,
        "pooled_projection_dim": pooled_dim,
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state,
    }


def _describe_non_flux(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    joined = " ".join(keys[:2000])
    hints = [
        ("double_stream_modulation_img", "a FLUX.2 model (FluxWorks runs FLUX.1)"),
        ("lora_", "a LoRA (load it with a LoRA node, not the model loader)"),
        ("input_blocks.", "a Stable Diffusion UNet"),
        ("encoder.block.", "a T5 text encoder (it belongs in models/text_encoders)"),
        ("text_model.encoder", "a CLIP text encoder (it belongs in models/text_encoders)"),
        ("decoder.conv_in", "a VAE (it belongs in models/vae)"),
        ("taesd_decoder", "a tiny VAE (taesd/taef1; it belongs in models/vae)"),
        ("controlnet", "a ControlNet (it belongs in models/controlnet)"),
    ]
    for needle, what in hints:
        if needle in joined:
            return f"it looks like {what}"
    return "first keys: " + ", ".join(keys[:5])


def _weight_files_and_config(path: str) -> tuple[list[str], dict]:
    """The safetensors files holding a FLUX.1 transformer (one file, or a diffusers folder's shards) and the
    folder's config.json ({} for a single file)."""
    if not os.path.isdir(path):
        return [path], {}
    folder = files.resolve_diffusers_transformer_folder(path)
    config_path = os.path.join(folder, "config.json")
    folder_config = files.read_json(config_path) if os.path.isfile(config_path) else {}
    return files.diffusers_weight_files(folder), folder_config


def state_dict_from_path(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Diffusers-layout FLUX.1 weights (+ folder config, if any) from a file or a diffusers folder."""
    weight_files, folder_config = _weight_files_and_config(path)
    return _as_diffusers(files.load_many(weight_files), path)[0], folder_config


def _as_diffusers(state: dict[str, torch.Tensor], path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(diffusers-layout weights, the layout they were stored in: 'bfl' or 'diffusers'), prefix stripped and
    scaled fp8 folded in; a file of another kind raises ValueError naming `path` and what it looks like."""
    state = dequantize_scaled_fp8(strip_prefix(state))
    layout = detect_layout(state)
    if layout == "bfl":
        try:
            state = bfl_to_diffusers(state)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    elif layout != "diffusers":
        raise ValueError(
            f"{path} is not a FLUX.1 transformer: expected BFL keys like 'double_blocks.0.img_attn.qkv.weight' "
            f"or diffusers keys like 'x_embedder.weight'; {_describe_non_flux(state)}"
        )
    return state, layout


def build_transformer(state: dict[str, torch.Tensor], config: FluxConfig, dtype: torch.dtype,
                      source: str = "FLUX.1 weights"):
    """Instantiate on the meta device and assign the weights (no second copy in memory); errors name `source`."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config.diffusers_kwargs())
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches: torch names the key, not the file
        raise ValueError(f"{source}: weights do not fit the FLUX.1 architecture inferred from them: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source}: weights do not fit the inferred FLUX.1 architecture: "
            f"missing {result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    return model.eval().requires_grad_(False)


def weight_file_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the file keeps its large matrices in (fp8 files keep norms and embedders wider)."""
    # A file without this key is refused by build_transformer, with its name; the embedder's dtype stands in.
    return state.get("transformer_blocks.0.attn.to_q.weight", state["x_embedder.weight"]).dtype


def load_flux_transformer(path: str, weight_dtype: str, default_compute: torch.dtype):
    """(model, config) for a `weight_dtype` choice (see `dtypes.storage_and_compute`).

    fp8 storage keeps weights in fp8 and upcasts each layer as it runs (diffusers layerwise casting).
    """
    state, folder_config = state_dict_from_path(path)
    axes = folder_config.get("axes_dims_rope")
    try:
        config = infer_config(state, tuple(axes) if axes else None)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    storage, compute = storage_and_compute(weight_dtype, weight_file_dtype(state), default_compute)
    fp8_in_file = {k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and is_fp8(v.dtype)}
    model = build_transformer(state, config, compute, path)
    if storage != compute:
        chosen = fp8_in_file if weight_dtype == "default" else None
        keep_linear_weights_in(model, storage, compute, only=chosen)
    logger.info(
        "loaded FLUX.1-%s from %s: %d double + %d single blocks, width %d, storage %s, compute %s",
        config.variant, path, config.num_layers, config.num_single_layers,
        config.num_attention_heads * config.attention_head_dim, storage, compute,
    )
    return model, config, compute


@dataclass(frozen=True)
class FluxFile:
    """A FLUX.1 transformer on disk as its headers describe it, before any weight is read: which files hold it,
    the layout they use, the architecture and the metadata. For runtimes other than diffusers (ComfyUI core's
    own FLUX model), which take the weights in their stored layout and need the architecture given to them."""

    path: str
    weight_files: tuple[str, ...]
    layout: str  # "bfl" (also ComfyUI's) or "diffusers", as stored
    config: FluxConfig
    metadata: dict[str, str]  # the safetensors metadata (a sharded folder's, merged)

    def load_state(self) -> dict[str, torch.Tensor]:
        """The weights as stored (file dtypes, scaled-fp8 scales kept), without a checkpoint prefix."""
        return strip_prefix(files.load_many(self.weight_files))


def read_flux_file(path: str) -> FluxFile:
    """Read a FLUX.1 transformer's architecture from its safetensors headers alone (shapes and key names, no
    weights), with the same checks and messages as `load_flux_transformer`, so a wrong, truncated or foreign file
    is refused, naming it, before gigabytes are read. Any width, head count and depth; the RoPE axes come from a
    diffusers folder's config.json when it has them, else from the head width (`_axes_for`)."""
    weight_files, folder_config = _weight_files_and_config(path)
    shapes: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for weight_file in weight_files:
        header = files.read_header(weight_file)
        metadata.update(header.metadata)
        shapes.update({k: torch.empty(s, device="meta") for k, s in header.shapes.items()})
    state, layout = _as_diffusers(shapes, path)
    axes = folder_config.get("axes_dims_rope")
    try:
        config = infer_config(state, tuple(axes) if axes else None)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    declared = folder_config.get("num_attention_heads")
    if declared is not None and declared != config.num_attention_heads:
        raise ValueError(f"{path}: config.json says num_attention_heads {declared}, but the weights have "
                         f"{config.num_attention_heads} heads of width {config.attention_head_dim}: the config "
                         "belongs to another model; fix or delete it")
    return FluxFile(path, tuple(weight_files), layout, config, metadata)
