"""Flux ControlNets in pure torch: loading every published format, residuals with start/end gating, token masks
and multi-control sums, control image fitting, and Canny / depth control maps. Nothing here imports ComfyUI."""

from .canny import canny_edges
from .images import control_inputs, fit_image, mask_to_tokens, pixel_cond
from .keys import FORMATS, detect_format
from .model import UNION_MODES, ControlNetConfig, FluxControlNet, build_controlnet, load_controlnet
from .residuals import ControlStack, ControlUnit, block_indices, step_active

__all__ = [
    "FORMATS",
    "UNION_MODES",
    "ControlNetConfig",
    "ControlStack",
    "ControlUnit",
    "FluxControlNet",
    "block_indices",
    "build_controlnet",
    "canny_edges",
    "control_inputs",
    "detect_format",
    "fit_image",
    "load_controlnet",
    "mask_to_tokens",
    "pixel_cond",
    "step_active",
]
