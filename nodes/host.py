"""Glue to ComfyUI's host services: model folders, devices and dtypes, ModelPatcher, progress bars."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..flux_models.holders import FluxModel, FluxTextEncoder
from ..flux_speed.prepare import transformer_blocks

logger = logging.getLogger(__name__)

FLUX_MODEL = "FLUX_MODEL"
FLUX_TEXT_ENCODER = "FLUX_TEXT_ENCODER"
FLUX_GUIDANCE = "FLUX_GUIDANCE"
CATEGORY = "FluxWorks"


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (exact and fast enough for small models), bf16 where the GPU has it, else fp16."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float16


def _is_diffusers_folder(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return os.path.isdir(os.path.join(path, "transformer"))
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return "FluxTransformer2DModel" in f.read()


def model_choices(folder: str = "diffusion_models") -> list[str]:
    """Single files plus diffusers folders (listed as folders; their shard files are hidden)."""
    folders: list[str] = []
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if dirpath != root and _is_diffusers_folder(dirpath):
                folders.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []
            elif depth >= 3:
                dirnames[:] = []
    hidden = tuple(f + "/" for f in folders)
    files = [f for f in folder_paths.get_filename_list(folder) if not f.replace(os.sep, "/").startswith(hidden)]
    return sorted(set(files) | set(folders))


def full_path(folder: str, name: str) -> str:
    """Absolute path of a listed file or diffusers folder; FileNotFoundError names what was looked for."""
    path = folder_paths.get_full_path(folder, name)
    if path is not None:
        return path
    for root in folder_paths.get_folder_paths(folder):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    roots = ", ".join(folder_paths.get_folder_paths(folder))
    raise FileNotFoundError(f"'{name}' was not found in the {folder} folders ({roots})")


def tokenizer_folders() -> tuple[str, str]:
    """CLIP-L and T5 tokenizer files that ship inside ComfyUI (nothing is fetched from a hub)."""
    comfy_dir = os.path.dirname(os.path.abspath(comfy.utils.__file__))
    return os.path.join(comfy_dir, "sd1_tokenizer"), os.path.join(comfy_dir, "text_encoders", "t5_tokenizer")


def wrap_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Put our module under ComfyUI's memory manager so it is loaded and evicted like core models."""
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def load_on_device(patcher) -> torch.device:
    """Move the whole model to its device through the memory manager (evicting others if needed)."""
    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher.load_device


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _unload(patcher) -> None:
    """Unload `patcher`'s model (any clone of it) if the memory manager holds it: that restores its original
    weights (a LoRA clone's too) and puts it on the offload device, the state streaming starts from."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.is_clone(patcher):
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


@contextlib.contextmanager
def streamed_on_device(patcher, resident_blocks: int, companions: Sequence = ()) -> Iterator[torch.device]:
    """Block offload: the model's weights (LoRAs merged) stay in CPU memory; only the embedders and output
    layers go to the device here, and the sampler's BlockOffloader moves the first `resident_blocks` blocks
    and streams the rest. A full load would need the whole model on the device, which is what offload avoids.

    The memory manager is asked to free what the device-side parts need (evicting other models), and
    `companions` (ControlNets) are loaded as usual. The model itself is patched on the offload device outside
    the manager's bookkeeping, so on exit it is unpatched and left there: the next prompt, with or without
    offload, loads it from the same clean state a fresh model has."""
    device = patcher.load_device
    transformer = patcher.model.transformer
    _unload(patcher)
    blocks = transformer_blocks(transformer)
    streamed = [_tensor_bytes(b) for b in blocks[max(resident_blocks, 0):]]
    others = [m for name, m in transformer.named_children() if name not in BLOCK_LISTS]
    needed = (sum(_tensor_bytes(m) for m in others) + sum(_tensor_bytes(b) for b in blocks[:resident_blocks])
              + 2 * max(streamed, default=0))  # the block in use and the one being prefetched
    mm.free_memory(needed + mm.minimum_inference_memory(), device)
    if companions:
        mm.load_models_gpu(list(companions), memory_required=needed, force_full_load=True)
    try:
        patcher.patch_model(device_to=patcher.offload_device)
        for module in others:
            module.to(device)
        yield device
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


def expect(value, type_name: str, node: str):
    """Reject a wrong object on a custom socket with a message naming what was expected."""
    expected = {FLUX_MODEL: FluxModel, FLUX_TEXT_ENCODER: FluxTextEncoder}[type_name]
    if not isinstance(getattr(value, "model", None), expected):
        raise TypeError(f"{node} expects a {type_name} from a FluxWorks loader, got {type(value).__name__}")
    return value


EMBEDDED_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embedded_model")


def register_embedded_model() -> None:
    """List the embedded tiny model's files (embedded_model/<folder>/) next to the user's own models."""
    for kind in ("diffusion_models", "text_encoders", "vae"):
        path = os.path.join(EMBEDDED_MODEL_DIR, kind)
        if os.path.isdir(path) and path not in folder_paths.get_folder_paths(kind):
            folder_paths.add_model_folder_path(kind, path)
