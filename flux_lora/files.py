"""Reading LoRA files: tensors, safetensors metadata, a sibling PEFT `adapter_config.json`, and a content hash
for the workflow's record of what was applied."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

SUFFIXES = (".safetensors", ".sft")


@dataclass(frozen=True)
class LoraFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    adapter_config: dict | None
    sha256: str
    size: int


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    if tensor.dtype == torch.float8_e4m3fn:  # torch has no isfinite for it; e4m3fn has NaN but no infinity
        return not bool(torch.isnan(tensor.to(torch.float16)).any())
    return bool(torch.isfinite(tensor).all())


def check_finite(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a LoRA holding NaN or infinite values (a training run that diverged, a broken conversion): merged
    into the model they turn every image black or into noise, silently. One pass per tensor, when the file is
    read (the node caches the read file, so a cached LoRA is not checked again)."""
    bad = [key for key, tensor in tensors.items() if not _finite(tensor)]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {len(bad)} of its {len(tensors)} tensors, first "
                         f"'{bad[0]}': the LoRA is broken (e.g. its training diverged); use another export of it")


def read_lora_file(path: str) -> LoraFile:
    """Load a `.safetensors` LoRA; errors name the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if not path.endswith(SUFFIXES):
        raise ValueError(f"{path}: only .safetensors LoRAs are loaded (pickled .ckpt/.pt/.bin files are not safe)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path} ({os.path.getsize(path)} bytes) is not a readable safetensors file: {exc}. "
                         "It may be truncated by an interrupted download.") from exc
    if not tensors:
        raise ValueError(f"{path} holds no tensors: it is not a LoRA")
    check_finite(path, tensors)
    config_path = os.path.join(os.path.dirname(path), "adapter_config.json")
    adapter_config = None
    if os.path.basename(path).startswith("adapter_model") and os.path.isfile(config_path):
        # A PEFT `save_pretrained` folder: lora_alpha and r live in the config next to the weights.
        try:
            with open(config_path, encoding="utf-8") as f:
                adapter_config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    return LoraFile(path, tensors, metadata, adapter_config, file_sha256(path), os.path.getsize(path))


def metadata_summary(metadata: dict[str, str]) -> str:
    """A short description of who made the file, from the keys trainers write (for logs)."""
    for key in ("software", "ss_sd_model_name", "modelspec.architecture"):
        if key in metadata:
            value = metadata[key]
            try:
                value = json.loads(value).get("name", value)
            except (json.JSONDecodeError, AttributeError):
                pass
            return f"{key}={value}"
    return ""
