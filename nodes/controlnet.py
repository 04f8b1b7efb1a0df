"""ControlNet nodes: load any Flux ControlNet, apply it (strength, start/end percent, mask, union mode) to a
conditioning, Canny and depth maps, BFL's structural models; and what FluxWorksSampler does with them.

Controls travel inside the positive CONDITIONING (key `fluxworks_controls`; `fluxworks_structural` for the
Canny/Depth-dev concat image). Images are fitted to the output when sampling: center-cropped to its aspect
ratio, then resized (area when shrinking, bilinear when enlarging); masks become per-token weights.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import folder_paths
import torch

from ..flux_controlnet import (
    UNION_MODES,
    ControlStack,
    ControlUnit,
    FluxControlNet,
    canny_edges,
    control_inputs,
    fit_image,
    load_controlnet,
)
from ..flux_controlnet.depth import DepthEstimator, is_depth_model_folder, load_depth_model
from ..flux_controlnet.model import check_batch
from ..flux_models.dtypes import WEIGHT_DTYPE_CHOICES
from ..flux_sampler.latents import LATENT_CHANNELS, to_model_space
from . import host

logger = logging.getLogger(__name__)

FLUX_CONTROLNET = "FLUX_CONTROLNET"
CONTROLS_KEY = "fluxworks_controls"
STRUCTURAL_KEY = "fluxworks_structural"
# FluxWorks' own key for models/depth: a generic "depth" key would be shared with any other pack that registers
# one (and core creates unknown keys without an extension filter, listing every file). The folder on disk is
# still models/depth.
DEPTH_FOLDER = "fluxworks_depth"
DEPTH_DIR = "depth"
STRUCTURAL_IN_CHANNELS = 2 * LATENT_CHANNELS * 4  # noise + control latent tokens (2x2 patches): Canny/Depth-dev
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.01}


def _register_depth_folders() -> None:
    """Depth models live in models/depth, and in a `depth` folder beside every controlnet folder (so roots
    from extra_model_paths.yaml work without another entry). They are folders (config.json + safetensors); the
    key lists their weight files only."""
    roots = [os.path.join(folder_paths.models_dir, DEPTH_DIR)]
    roots += [os.path.join(os.path.dirname(p), DEPTH_DIR) for p in folder_paths.get_folder_paths("controlnet")]
    for root in roots:
        host.register_folder(DEPTH_FOLDER, root)


_register_depth_folders()


@dataclass(frozen=True)
class AppliedControl:
    """One FluxWorksControlNetApply: the ControlNet's patcher and the unprepared control inputs."""

    patcher: Any
    image: torch.Tensor
    strength: float
    start: float
    end: float
    mode: int | None
    vae: Any
    mask: torch.Tensor | None


@dataclass(frozen=True)
class StructuralImage:
    image: torch.Tensor
    vae: Any


def _folder_choices(folder: str, is_model_folder) -> tuple[list[str], list[str]]:
    """(model folders, files outside them) under every root of a models folder kind."""
    folders = []
    for root in host.folder_roots(folder):
        if os.path.isdir(root):
            for dirpath, dirnames, _ in os.walk(root, followlinks=True):
                if dirpath != root and is_model_folder(dirpath):
                    folders.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                    dirnames[:] = []
    hidden = tuple(f + "/" for f in folders)
    files = [f for f in host.filename_list(folder) if not f.replace(os.sep, "/").startswith(hidden)]
    return sorted(set(folders)), files


def _finite(node: str, **values: float) -> None:
    """Refuse NaN/inf settings by name: NaN slips through every range comparison and silently disables or
    corrupts the control."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{node}: {name} is {value!r}; it must be a finite number (see the widget's range)")


def _is_controlnet_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return "FluxControlNetModel" in f.read()


def _expect_controlnet(value, node: str):
    if not isinstance(getattr(value, "model", None), FluxControlNet):
        raise TypeError(f"{node} expects a {FLUX_CONTROLNET} from FluxWorksControlNetLoader, got {type(value).__name__}")
    return value


def _encode(vae, image: torch.Tensor) -> torch.Tensor:
    """IMAGE -> model-space latent (B, 16, H/8, W/8) with a core VAE; the FLUX.1 VAE is required."""
    latent = vae.encode(image[..., :3])
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"the VAE gives {tuple(latent.shape[1:2])}-channel latents; FLUX.1 control images need the "
                         "FLUX.1 VAE (ae.safetensors)")
    return to_model_space(latent.float())


class FluxWorksControlNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        folders, files = _folder_choices("controlnet", _is_controlnet_folder)
        return {"required": {
            "control_net_name": (sorted(set(folders) | set(files)), {
                "tooltip": "InstantX/Shakker (file or diffusers folder), Union/Union-Pro, XLabs or MistoLine, "
                           "in models/controlnet."}),
            "weight_dtype": (list(WEIGHT_DTYPE_CHOICES), {"default": "default"}),
        }}

    RETURN_TYPES = (FLUX_CONTROLNET,)
    RETURN_NAMES = ("control_net",)
    FUNCTION = "load"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Loads any Flux ControlNet; its format and size are read from the weights."

    def load(self, control_net_name: str, weight_dtype: str):
        path = host.full_path("controlnet", control_net_name)
        device, offload = host.model_devices()
        net = load_controlnet(path, weight_dtype, host.default_compute_dtype(device))
        return (host.wrap_patcher(net, device, offload),)


class FluxWorksControlNetApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "control_net": (FLUX_CONTROLNET,),
                "image": ("IMAGE", {"tooltip": "Fitted to the output: center crop to its aspect, then resize."}),
                "strength": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, **_PERCENT, "tooltip": "Step i of n is controlled when "
                                            "start <= i/n and (i+1)/n <= end (diffusers' rule)."}),
                "end_percent": ("FLOAT", {"default": 1.0, **_PERCENT}),
                "union_mode": (["none", *UNION_MODES], {"tooltip": "Union/Union-Pro only: what the image shows."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "The FLUX.1 VAE; InstantX/Union ControlNets read the encoded image."}),
                "mask": ("MASK", {"tooltip": "Control only inside the mask; soft edges weaken it gradually."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Adds a ControlNet to a conditioning; chain several to combine them."

    def apply(self, conditioning, control_net, image, strength: float, start_percent: float, end_percent: float,
              union_mode: str, vae=None, mask=None):
        net = _expect_controlnet(control_net, "FluxWorksControlNetApply").model
        _finite("FluxWorksControlNetApply", strength=strength, start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        if image.ndim != 4:
            raise ValueError(f"image must be an IMAGE (batch, height, width, channels), got {tuple(image.shape)}")
        mode = None if union_mode == "none" else UNION_MODES.index(union_mode)
        if net.config.num_mode is not None and mode is None:
            raise ValueError(f"{os.path.basename(net.source)} is a Union ControlNet: set union_mode to what the "
                             f"image shows ({', '.join(UNION_MODES)})")
        if net.config.num_mode is None and mode is not None:
            raise ValueError(f"{os.path.basename(net.source)} is not a Union ControlNet: set union_mode to 'none'")
        if net.config.latent_input and vae is None:
            raise ValueError(f"{os.path.basename(net.source)} ({net.config.kind}) reads the VAE-encoded control "
                             "image: connect the FLUX.1 VAE (ae.safetensors) to the vae input")
        if mask is not None and mask.ndim not in (2, 3):
            raise ValueError(f"mask must be a MASK (batch, height, width), got {tuple(mask.shape)}")
        control = AppliedControl(control_net, image, strength, start_percent, end_percent, mode, vae, mask)
        return ([[t, {**d, CONTROLS_KEY: (*d.get(CONTROLS_KEY, ()), control)}] for t, d in conditioning],)


class FluxWorksStructuralControl:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "vae": ("VAE",),
                             "image": ("IMAGE", {"tooltip": "Canny edges or a depth map, fitted to the output."})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Control image for BFL's FLUX.1-Canny-dev / Depth-dev (load them with FluxWorksModelLoader): "
                   "encoded and concatenated to the image tokens. Guidance around 30 (canny) / 10 (depth).")

    def apply(self, conditioning, vae, image):
        if image.ndim != 4:
            raise ValueError(f"image must be an IMAGE (batch, height, width, channels), got {tuple(image.shape)}")
        return ([[t, {**d, STRUCTURAL_KEY: StructuralImage(image, vae)}] for t, d in conditioning],)


class FluxWorksCannyEdges:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "low_threshold": ("FLOAT", {"default": 0.1, **_PERCENT, "tooltip": "Weak edges (1 = a sharp black-to-"
                                        "white step) are kept only where connected to strong ones."}),
            "high_threshold": ("FLOAT", {"default": 0.2, **_PERCENT}),
            "blur_sigma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "detect"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Canny edge map (white edges on black), computed in torch on the GPU when there is one."

    def detect(self, image, low_threshold: float, high_threshold: float, blur_sigma: float):
        _finite("FluxWorksCannyEdges", low_threshold=low_threshold, high_threshold=high_threshold,
                blur_sigma=blur_sigma)
        edges = canny_edges(image.to(host.compute_device()), low_threshold, high_threshold, blur_sigma,
                            interrupt=host.check_interrupt)
        return (edges[..., None].expand(*edges.shape, 3).to(host.intermediate_device(), torch.float32),)


class FluxWorksDepthEstimate:
    @classmethod
    def INPUT_TYPES(cls):
        folders, _ = _folder_choices(DEPTH_FOLDER, is_depth_model_folder)
        return {"required": {"image": ("IMAGE",), "model_name": (folders, {
            "tooltip": "A transformers DPT / Depth Anything folder (config.json, preprocessor_config.json, "
                       "safetensors) in models/depth; nothing is downloaded."})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "estimate"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Relative depth map (near = bright) for depth ControlNets."

    def estimate(self, image, model_name: str):
        path = host.full_path(DEPTH_FOLDER, model_name)
        model, processor = load_depth_model(path)
        device, offload = host.model_devices()
        estimator = DepthEstimator(model.to(host.default_compute_dtype(device)), processor, path)
        host.load_on_device(host.wrap_patcher(estimator, device, offload))
        depth = estimator(image, host.check_interrupt)
        return (depth[..., None].expand(*depth.shape, 3).to(host.intermediate_device(), torch.float32),)


class SamplerControls:
    """The controls of a positive conditioning, prepared for one FluxWorksSampler run on `samples`."""

    def __init__(self, positive, negative, flux, samples: torch.Tensor) -> None:
        extras = positive[0][1] if positive else {}
        if negative and (negative[0][1].get(CONTROLS_KEY) or negative[0][1].get(STRUCTURAL_KEY)):
            logger.info("FluxWorksSampler: controls on the negative prompt are ignored; the positive prompt's "
                        "ControlNet residuals are used for both, as diffusers does")
        self.applied: tuple[AppliedControl, ...] = tuple(extras.get(CONTROLS_KEY, ()))
        h, w = samples.shape[2:]
        self.units = [self._prepare(c, samples.shape[0], h, w) for c in self.applied]
        self.concat = self._structural(extras.get(STRUCTURAL_KEY), flux.config.in_channels, h, w)

    @staticmethod
    def _prepare(control: AppliedControl, batch: int, h: int, w: int):
        net = control.patcher.model
        name = os.path.basename(net.source)
        check_batch(control.image.shape[0], batch, f"the control image of {name}")
        if control.mask is not None and control.mask.ndim == 3:
            check_batch(control.mask.shape[0], batch, f"the mask of {name}")
        encode = None if control.vae is None else (lambda image: _encode(control.vae, image))
        return (net, *control_inputs(net.config.latent_input, control.image, control.mask, h, w, encode))

    @staticmethod
    def _structural(spec: StructuralImage | None, in_channels: int, h: int, w: int):
        if in_channels == STRUCTURAL_IN_CHANNELS and spec is None:
            raise ValueError("this model (128 input channels: FLUX.1-Canny-dev or Depth-dev) needs a control image: "
                             "connect FluxWorksStructuralControl to the positive conditioning")
        if spec is None:
            return None
        if in_channels != STRUCTURAL_IN_CHANNELS:
            raise ValueError(f"FluxWorksStructuralControl feeds BFL's Canny/Depth-dev models (128 input channels); "
                             f"this model has {in_channels}: use FluxWorksControlNetApply with a ControlNet instead")
        return _encode(spec.vae, fit_image(spec.image, h * 8, w * 8))

    def load_models(self, patcher) -> torch.device:
        """Load the FLUX.1 model and every ControlNet together, so one does not evict another."""
        return host.load_on_device(patcher, [c.patcher for c in self.applied])

    def on_device(self, device: torch.device, transformer_config) -> tuple[ControlStack | None, torch.Tensor | None]:
        """The sampler's `controls` and `concat_latent` arguments."""
        stack = None
        if self.units:
            units = [ControlUnit(net, cond.to(device, net.compute_dtype), c.strength, c.start, c.end, c.mode,
                                 None if mask is None else mask.to(device))
                     for c, (net, cond, mask) in zip(self.applied, self.units, strict=True)]
            stack = ControlStack(units, transformer_config)
        return stack, None if self.concat is None else self.concat.to(device)


NODE_CLASS_MAPPINGS = {
    "FluxWorksControlNetLoader": FluxWorksControlNetLoader,
    "FluxWorksControlNetApply": FluxWorksControlNetApply,
    "FluxWorksStructuralControl": FluxWorksStructuralControl,
    "FluxWorksCannyEdges": FluxWorksCannyEdges,
    "FluxWorksDepthEstimate": FluxWorksDepthEstimate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxWorksControlNetLoader": "FluxWorks Load ControlNet",
    "FluxWorksControlNetApply": "FluxWorks Apply ControlNet",
    "FluxWorksStructuralControl": "FluxWorks Canny/Depth-dev Control Image",
    "FluxWorksCannyEdges": "FluxWorks Canny Edges",
    "FluxWorksDepthEstimate": "FluxWorks Depth Map",
}
