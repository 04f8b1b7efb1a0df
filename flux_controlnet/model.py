"""Flux ControlNets of every published format as one diffusers `FluxControlNetModel`, config read from weights.

InstantX/Shakker/Union files are already diffusers `FluxControlNetModel`s. XLabs' architecture is the same
model with a pixel hint encoder (`conditioning_embedding_channels=16`, 2x2 patches), which diffusers also
implements. MistoLine differs in two places, which `build_controlnet` swaps in: each control projection is
Linear followed by SiLU, and its pixel hint encoder has ten convolutions (`MistolineHintEncoder`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from ..flux_models import files
from ..flux_models.dtypes import storage_and_compute
from ..flux_models.transformer import FLUX1_AXES, backbone_fields
from .keys import EXPECTED, describe_non_controlnet, detect_format, to_diffusers

logger = logging.getLogger(__name__)

# Union / Union-Pro control modes for FLUX.1 (InstantX and Shakker model cards; not the SDXL union table).
UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")

# MistoLine's pixel hint encoder: (in, out, kernel, stride) per convolution, SiLU between them; three
# stride-2 convolutions take the image to latent resolution (1/8).
_MISTOLINE_HINT = ((3, 16, 3, 1), (16, 16, 1, 1), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2),
                   (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 1, 1), (16, 16, 3, 1))


class MistolineHintEncoder(torch.nn.Module):
    """(B, 3, H, W) image in [-1, 1] -> (B, 16, H/8, W/8) features; `encoder` indices match MistoLine's files."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for i, (cin, cout, kernel, stride) in enumerate(_MISTOLINE_HINT):
            if i:
                layers.append(torch.nn.SiLU())
            layers.append(torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2))
        self.encoder = torch.nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


@dataclass(frozen=True)
class ControlNetConfig:
    """What the weights say about a Flux ControlNet."""

    kind: str  # "instantx" | "union" | "xlabs" | "mistoline"
    in_channels: int
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    axes_dims_rope: tuple[int, int, int]
    num_mode: int | None

    @property
    def latent_input(self) -> bool:
        """InstantX-style nets read the VAE-encoded control image; XLabs and MistoLine read pixels."""
        return self.kind in ("instantx", "union")

    @property
    def inner_dim(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    def diffusers_kwargs(self) -> dict:
        pixel = not self.latent_input
        return {
            "patch_size": 2 if pixel else 1,  # the pixel hint encoder's output is packed in 2x2 patches
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
            "num_mode": self.num_mode,
            "conditioning_embedding_channels": 16 if self.kind == "xlabs" else None,
        }


def _axes(head_dim: int, folder_axes) -> tuple[int, int, int]:
    if folder_axes:
        return tuple(folder_axes)
    if head_dim != 128:
        raise ValueError(f"attention head width {head_dim} is not FLUX.1's 128 and no config.json gives "
                         "axes_dims_rope: put the ControlNet in a diffusers folder with its config.json")
    return FLUX1_AXES


def infer_config(state: dict[str, torch.Tensor], kind: str, folder_axes=None) -> ControlNetConfig:
    """A ControlNetConfig from diffusers-layout weights (shapes and key names only)."""
    try:
        hidden, in_channels = state["x_embedder.weight"].shape
        control_in = state["controlnet_x_embedder.weight"].shape[1]
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        joint_dim = state["context_embedder.weight"].shape[1]
        pooled_dim = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
    except KeyError as exc:
        raise ValueError(f"Flux ControlNet weights are missing the key {exc.args[0]!r}") from exc
    if control_in != in_channels:
        raise ValueError(f"the control input has {control_in} channels but the image input {in_channels}: "
                         "inpainting ControlNets (control image + mask) are not supported")
    if in_channels != 64:
        raise ValueError(f"the ControlNet reads {in_channels}-channel tokens; FLUX.1 ControlNets read 64 "
                         "(16 latent channels in 2x2 patches)")
    mode = state.get("controlnet_mode_embedder.weight")
    return ControlNetConfig(
        kind=kind,
        in_channels=in_channels,
        **backbone_fields(state, hidden, head_dim, joint_dim, pooled_dim),
        axes_dims_rope=_axes(head_dim, folder_axes),
        num_mode=None if mode is None else int(mode.shape[0]),
    )


def build_controlnet(config: ControlNetConfig, state: dict[str, torch.Tensor] | None = None,
                     dtype: torch.dtype = torch.float32, source: str = "Flux ControlNet"):
    """A diffusers `FluxControlNetModel` for `config` (MistoLine parts swapped in), holding `state` if given,
    else randomly initialised (zero-initialised projections, as diffusers makes them); errors name `source`."""
    from diffusers import FluxControlNetModel

    with torch.device("meta") if state is not None else contextlib.nullcontext():
        model = FluxControlNetModel(**config.diffusers_kwargs())
        if config.kind == "mistoline":
            width = config.inner_dim
            model.controlnet_blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.SiLU()) for _ in range(config.num_layers))
            model.controlnet_single_blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.SiLU())
                for _ in range(config.num_single_layers))
            model.input_hint_block = MistolineHintEncoder()
    if state is None:
        model = model if dtype == torch.float32 else model.to(dtype)  # modules are created in float32
        return model.eval().requires_grad_(False)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches: torch names the key, not the file
        raise ValueError(f"{source}: {config.kind} ControlNet weights do not fit the architecture inferred from "
                         f"them: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source}: {config.kind} ControlNet weights do not fit the inferred architecture: "
                         f"missing {result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")
    return model.eval().requires_grad_(False)


class FluxControlNet(torch.nn.Module):
    """A loaded ControlNet plus how its residuals reach the transformer's blocks."""

    def __init__(self, model: torch.nn.Module, config: ControlNetConfig, compute_dtype: torch.dtype,
                 source: str) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.compute_dtype = compute_dtype
        self.source = source
        self.device = torch.device("cpu")  # ComfyUI's ModelPatcher keeps this attribute up to date

    @property
    def cyclic(self) -> bool:
        """XLabs and MistoLine residuals repeat block by block (0, 1, 0, 1, ...); InstantX ones are spread
        evenly (0, 0, 1, 1, ...), as diffusers' `controlnet_blocks_repeat` and ComfyUI's ControlNetFlux do."""
        return not self.config.latent_input

    def describe(self) -> str:
        c = self.config
        modes = f", {c.num_mode} union modes" if c.num_mode else ""
        return f"{c.kind} ControlNet, {c.num_layers} double + {c.num_single_layers} single blocks{modes}"

    def residuals(self, inputs: dict, cond: torch.Tensor, mode: int | None, strength: float, guidance: float):
        """(double, single) residual lists of one evaluation (either may be None), scaled by `strength`.

        `inputs` are the transformer's diffusers keyword inputs; `cond` is the packed control latent (B, L, 64)
        for latent-input nets or the (B, 3, H, W) image in [-1, 1] for pixel-input ones.
        """
        hidden = inputs["hidden_states"]
        b = hidden.shape[0]
        device, dtype = hidden.device, self.compute_dtype
        controlnet_mode = None
        if self.config.num_mode is not None:
            if mode is None:
                raise ValueError(f"{self.source} is a Union ControlNet: choose a union mode ({', '.join(UNION_MODES)})")
            controlnet_mode = torch.full((b, 1), mode, device=device, dtype=torch.long)
        elif mode is not None:
            raise ValueError(f"{self.source} is not a Union ControlNet: set the union mode to 'none'")
        use_guidance = self.config.guidance_embeds
        double, single = self.model(
            hidden_states=hidden.to(dtype),
            controlnet_cond=_batched(cond, b).to(device=device, dtype=dtype),
            controlnet_mode=controlnet_mode,
            conditioning_scale=strength,
            encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
            pooled_projections=inputs["pooled_projections"].to(dtype),
            timestep=inputs["timestep"],
            img_ids=inputs["img_ids"],
            txt_ids=inputs["txt_ids"],
            guidance=torch.full((b,), guidance, device=device, dtype=torch.float32) if use_guidance else None,
            return_dict=False,
        )
        return double, single


def check_batch(count: int, latents: int, what: str) -> None:
    """One control image (or mask) serves every latent of the batch; otherwise the counts must match. `what`
    names it, e.g. "the control image of canny.safetensors"."""
    if count in (1, latents):
        return
    options = "give just one" if latents == 1 else f"give one (it serves every latent) or {latents}"
    raise ValueError(f"{what} is a batch of {count} but the latent batch is {latents}: {options}, or set the latent "
                     f"batch_size to {count}")


def _batched(cond: torch.Tensor, batch: int) -> torch.Tensor:
    if cond.shape[0] == batch:
        return cond
    check_batch(cond.shape[0], batch, "the control image")
    return cond.expand(batch, *cond.shape[1:])


def state_dict_from_path(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """ControlNet weights (+ folder config.json, if any) from a single file or a diffusers folder."""
    folder_config: dict = {}
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            folder_config = files.read_json(config_path)
        state = files.load_many(files.diffusers_weight_files(path))
    else:
        state = files.load_safetensors(path)
    return state, folder_config


def load_controlnet(path: str, weight_dtype: str, default_compute: torch.dtype) -> FluxControlNet:
    """Any Flux ControlNet file or folder, its format and architecture read from the weights.

    `weight_dtype` is a loader choice (see `flux_models.dtypes.storage_and_compute`); fp8 storage keeps the
    weights in fp8 and upcasts each layer as it runs (diffusers layerwise casting).
    """
    raw, folder_config = state_dict_from_path(path)
    kind = detect_format(raw)
    if not kind:
        raise ValueError(f"{os.path.basename(path)} is not a Flux ControlNet: {EXPECTED}; {describe_non_controlnet(raw)}")
    try:
        state = to_diffusers(raw, kind)
        config = infer_config(state, kind, folder_config.get("axes_dims_rope"))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    file_dtype = state["x_embedder.weight"].dtype
    storage, compute = storage_and_compute(weight_dtype, file_dtype, default_compute)
    model = build_controlnet(config, state, compute, path)
    if storage != compute:
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    net = FluxControlNet(model, config, compute, path)
    logger.info("loaded %s from %s (storage %s, compute %s)", net.describe(), path, storage, compute)
    return net
