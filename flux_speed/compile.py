"""Regional torch.compile and attention-backend choice for a diffusers FLUX.1 transformer."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None) -> None:
    """Compile each double/single block once (they share code, so the cache is reused across blocks and
    resolutions become dynamic after the first change instead of recompiling every run)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            block.compile(fullgraph=True, dynamic=None, mode=mode)


def best_attention_backend(device: torch.device) -> str:
    """cuDNN SDPA on NVIDIA GPUs (the fastest attention available without extra packages), native elsewhere."""
    if device.type == "cuda" and torch.backends.cudnn.is_available():
        return "_native_cudnn"
    return "native"


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    transformer.set_attention_backend(backend)
    logger.info("FLUX.1 attention backend: %s", backend)
