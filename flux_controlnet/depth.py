"""Depth maps for depth ControlNets from a transformers depth model (DPT, Depth Anything) in a local folder.

Nothing is downloaded: the folder must hold `config.json`, the image processor's `preprocessor_config.json`
and safetensors weights, as `save_pretrained` (or a Hugging Face snapshot) writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

REQUIRED_FILES = ("config.json", "preprocessor_config.json")


def is_depth_model_folder(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, name)) for name in REQUIRED_FILES)


class DepthEstimator(torch.nn.Module):
    """A transformers depth model and its image processor as one module a host's memory manager can move
    (transformers models have a read-only `device`, which ComfyUI's ModelPatcher wants to set)."""

    def __init__(self, model: torch.nn.Module, processor, source: str) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.source = source
        self.device = torch.device("cpu")

    def forward(self, image: torch.Tensor, interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        return estimate_depth(self.model, self.processor, image, interrupt)


def load_depth_model(folder: str):
    """(model, image_processor) from a local folder; errors name the folder and the missing files."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"depth model folder not found: {folder}")
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        missing.append("*.safetensors weights")
    if missing:
        raise FileNotFoundError(f"{folder} is not a transformers depth model folder: missing {', '.join(missing)} "
                                "(save one with save_pretrained, or copy a Hugging Face snapshot such as "
                                "depth-anything/Depth-Anything-V2-Small-hf)")
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except ValueError as exc:
        raise ValueError(f"{folder} does not hold a depth-estimation model (DPT, Depth Anything...): {exc}") from exc
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval().requires_grad_(False), processor


@torch.no_grad()
def estimate_depth(model, processor, image: torch.Tensor,
                   interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> relative depth (B, H, W) in [0, 1], near = bright, one map per image.

    The model's output is resized to the image (bicubic, as transformers' depth pipeline does) and each map
    is stretched to [0, 1]; DPT and Depth Anything predict inverse depth, so nearer is larger. `interrupt` (a
    cancel check that raises) runs before every layer of the model's layer lists (its ViT blocks and neck
    stages), so a large batch on a CPU can be cancelled midway; the batch itself stays one call.
    """
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE of shape (batch, height, width, channels), got {tuple(image.shape)}")
    device = next(model.parameters()).device
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    pixels = [frame.movedim(-1, 0).float().cpu() for frame in rgb]
    inputs = processor(images=pixels, return_tensors="pt", do_rescale=False)
    values = inputs["pixel_values"].to(device=device, dtype=next(model.parameters()).dtype)
    handles = [] if interrupt is None else [
        layer.register_forward_pre_hook(lambda *_: interrupt())
        for layers in model.modules() if isinstance(layers, torch.nn.ModuleList) for layer in layers]
    try:
        predicted = model(pixel_values=values).predicted_depth.float()  # (B, h, w)
    finally:
        for handle in handles:
            handle.remove()
    depth = F.interpolate(predicted[:, None], size=image.shape[1:3], mode="bicubic", align_corners=False)[:, 0]
    low = depth.amin(dim=(1, 2), keepdim=True)
    high = depth.amax(dim=(1, 2), keepdim=True)
    return ((depth - low) / (high - low).clamp_min(1e-8)).clamp(0.0, 1.0)
