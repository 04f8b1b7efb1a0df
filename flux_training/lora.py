"""The trained LoRA: which layers get one, the peft adapter on the transformer while training runs, and the file.

Layer presets follow diffusers' `train_dreambooth_lora_flux.py --lora_layers`: its default list is "attention +
MLP"; "attention" is the attention projections of both block kinds; "all" adds the single blocks' MLP/output
projections and every block's adaLN modulation. Names are suffixes peft matches against module names, except the
single blocks' `proj_out`, written in full (`single_transformer_blocks.N.proj_out`) because the bare name also matches
the transformer's final output layer.

The file is what the script writes: `FluxPipeline.save_lora_weights` of `get_peft_model_state_dict(transformer)` with
the adapter's `LoraConfig.to_dict()` as `transformer_lora_adapter_metadata` (diffusers' `_collate_lora_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

import torch

ATTENTION = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
EXTRA_ALL = ("proj_mlp", "norm1.linear", "norm1_context.linear", "norm.linear")
LORA_LAYERS = ("attention", "attention_mlp", "all")


def lora_target_modules(transformer: torch.nn.Module, layers: str) -> list[str]:
    """peft `target_modules` for a preset of LORA_LAYERS, or a comma-separated list as the script's --lora_layers."""
    if layers == "attention":
        return list(ATTENTION)
    if layers == "attention_mlp":
        return list(ATTENTION + MLP)
    if layers == "all":
        single = [f"single_transformer_blocks.{i}.proj_out" for i in range(len(transformer.single_transformer_blocks))]
        return list(ATTENTION + MLP + EXTRA_ALL) + single
    names = [n.strip() for n in layers.split(",") if n.strip()]
    if not names:
        raise ValueError(f"lora_layers {layers!r}: use one of {LORA_LAYERS} or a comma-separated module list such "
                         "as 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0'")
    return names


def lora_config(transformer: torch.nn.Module, rank: int, alpha: float, layers: str, dropout: float = 0.0):
    """The script's `LoraConfig` (gaussian init of A, zero B, so training starts at the base model)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=lora_target_modules(transformer, layers))


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's trainable tensors, in module order (the order optimiser states are saved in)."""
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def training_adapter(transformer: torch.nn.Module, config, resume_from: str | None = None) -> Iterator[list]:
    """Add the adapter to `transformer` (base weights frozen; LoRA tensors float32 and trainable), optionally
    loaded from a LoRA file, and remove it on exit (diffusers `unload_lora`), so the caller's model is left as it
    was: the ComfyUI model a node trains on is shared with other nodes."""
    if getattr(transformer, "_hf_peft_config_loaded", False):
        raise ValueError("the transformer already carries a peft adapter; train on a model without one")
    grad_before = {n: p.requires_grad for n, p in transformer.named_parameters()}
    transformer.requires_grad_(False)
    transformer.add_adapter(config)
    try:
        params = lora_parameters(transformer)
        if not params:
            raise ValueError(f"no layer of the transformer matches the LoRA target modules {config.target_modules}")
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        if resume_from is not None:
            load_lora_into(transformer, resume_from)
        yield params
    finally:
        transformer.unload_lora()
        for n, p in transformer.named_parameters():
            p.requires_grad_(grad_before.get(n, False))


def adapter_state(transformer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter as diffusers file keys (`transformer.<module>.lora_A.weight`), as `save_lora_weights` writes them."""
    from peft.utils import get_peft_model_state_dict

    return {f"transformer.{k}": v.detach().to(dtype).contiguous().cpu()
            for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer: torch.nn.Module, path: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the adapter as `train_dreambooth_lora_flux.py` does (FluxPipeline.save_lora_weights + metadata),
    atomically (a temporary file renamed into place, so an interrupted save never leaves half a file)."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name="lora.safetensors",
                                       transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
        os.replace(os.path.join(tmp, "lora.safetensors"), path)
    return path


def read_metadata(path: str) -> dict:
    """The `lora_adapter_metadata` of a LoRA file (the LoraConfig it was trained with), {} when absent."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def load_lora_into(transformer: torch.nn.Module, path: str) -> None:
    """Copy a LoRA file in the script's layout into the transformer's adapter (resuming); every adapter tensor must
    be in the file with its shape, so a file of another rank or other layers is refused by name."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume LoRA {path} does not exist")
    file = load_file(path)
    own = {k: p for k, p in transformer.named_parameters() if "lora_" in k}
    wanted = {k.replace(".default.weight", ".weight"): k for k in own}
    missing = [f"transformer.{k}" for k in wanted if f"transformer.{k}" not in file]
    if missing:
        raise ValueError(f"{path} does not fit this training's adapter (other rank or layers?): it lacks "
                         f"{missing[:3]} and {max(0, len(missing) - 3)} more; train with the settings it was made "
                         f"with ({read_metadata(path) or 'no metadata'})")
    with torch.no_grad():
        for short, name in wanted.items():
            tensor = file[f"transformer.{short}"]
            if tensor.shape != own[name].shape:
                raise ValueError(f"{path}: transformer.{short} has shape {tuple(tensor.shape)}, the adapter needs "
                                 f"{tuple(own[name].shape)}: resume with the rank it was trained with")
            own[name].copy_(tensor)
