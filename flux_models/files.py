"""Reading safetensors files and diffusers folders with errors that name the file and the fix."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

WEIGHT_SUFFIXES = (".safetensors", ".sft")
# Metadata key of a transformer file naming the VAE whose latent space it was trained in, for live previews: a
# file name in ComfyUI's `vae` folders, in TAESD layout (`taesd_decoder.*`). Set on the embedded model (its tiny
# VAE has other colours than FLUX.1's, so core's Flux preview map shows wrong ones); real FLUX.1 files have none.
PREVIEW_VAE_KEY = "fluxworks.preview_vae"


def load_safetensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a missing, truncated or non-safetensors file raises ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if not path.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{path}: only .safetensors files are loaded (pickled .ckpt/.pt/.bin files are not safe)")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        size = os.path.getsize(path)
        raise ValueError(
            f"{path} ({size} bytes) is not a readable safetensors file: {exc}. "
            "It may be truncated by an interrupted download, or not a safetensors file at all."
        ) from exc


@dataclass(frozen=True)
class Header:
    """What a safetensors file says without reading its tensors: key names, shapes and metadata."""

    keys: tuple[str, ...]
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]


@functools.lru_cache(maxsize=1024)
def _header(path: str, size: int, mtime_ns: int) -> Header:
    """Keyed by the file's size and mtime as well, so a replaced file is read again (the arguments are what
    invalidates the cache; only `path` is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = tuple(f.keys())
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
            return Header(keys, dict(f.metadata() or {}), shapes)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(
            f"{path} ({size} bytes) is not a readable safetensors file: {exc}. "
            "It may be truncated by an interrupted download, or not a safetensors file at all."
        ) from exc


def read_header(path: str) -> Header:
    """The keys, shapes and metadata of a safetensors file, read once per version of the file (pickers list many
    files on every page load, and a T5-XXL file is ~10 GB: only its JSON header is read here)."""
    if not path.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{path}: only .safetensors files are loaded (pickled .ckpt/.pt/.bin files are not safe)")
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise FileNotFoundError(f"weight file not found: {path} ({exc.strerror})") from exc
    return _header(path, stat.st_size, stat.st_mtime_ns)


def load_many(paths: Iterable[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(load_safetensors(path))
    return state


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def diffusers_weight_files(folder: str) -> list[str]:
    """The safetensors files of a diffusers model folder (single or sharded)."""
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [os.path.join(folder, name) for name in shards]
    files = sorted(
        os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(WEIGHT_SUFFIXES)
    )
    if not files:
        raise ValueError(f"diffusers folder {folder} holds no .safetensors weights")
    return files


def resolve_diffusers_transformer_folder(folder: str) -> str:
    """A transformer folder itself, or a pipeline folder's `transformer/` subfolder."""
    if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isdir(
        os.path.join(folder, "transformer")
    ):
        return os.path.join(folder, "transformer")
    return folder


def preview_vae_name(path: str) -> str | None:
    """The VAE file name a single-file transformer names for previews (`PREVIEW_VAE_KEY`), or None."""
    if not os.path.isfile(path) or not path.endswith(WEIGHT_SUFFIXES):
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get(PREVIEW_VAE_KEY)
