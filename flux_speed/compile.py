"""Regional torch.compile and attention-backend choice for a diffusers FLUX.1 transformer."""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

# Inductor kernel tuning for the blocks: coordinate descent over each Triton kernel's launch config (block
# sizes, warps) and the wider pointwise/reduction config search; aimed at the per-token fp8 quantisation
# reductions. Passed per compile (torch.compile(options=...)), so the process-wide Inductor config is untouched.
KERNEL_TUNING_OPTIONS = {"coordinate_descent_tuning": True, "max_autotune_pointwise": True}


# torch.compile keeps at most `cache_size_limit` compiled variants per code object; the blocks share one code
# object per block type, and resolutions, batch sizes and the first single block's input layout add variants.
# Raised only while a FluxWorks sampling run executes (`compile_limits`), never for the whole process.
BLOCK_CACHE_SIZE_LIMIT = 64


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None, tune_kernels: bool = False) -> None:
    """Compile each double/single block's forward (they share code, so the cache is reused across blocks and
    resolutions become dynamic after the first change instead of recompiling every run). The compiled function
    replaces the block's `forward`, so hooks registered afterwards (step cache, block offload: diffusers'
    hook registry wraps `forward`) stay in eager Python around it. `tune_kernels` benchmarks kernel configs
    while compiling (slower first run, possibly faster steps)."""
    if tune_kernels and mode is not None:
        raise ValueError("compile_blocks: tune_kernels sets Inductor options, which torch.compile cannot combine "
                         f"with mode={mode!r}")
    kwargs = {"options": dict(KERNEL_TUNING_OPTIONS)} if tune_kernels else {"mode": mode}
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            block.forward = torch.compile(block.forward, fullgraph=True, dynamic=None, **kwargs)


def compile_limits():
    """Context for a sampling run of compiled blocks: dynamo's per-code cache limit raised to
    BLOCK_CACHE_SIZE_LIMIT, restored on exit so other packs' torch.compile keep the process default."""
    limit = max(torch._dynamo.config.cache_size_limit, BLOCK_CACHE_SIZE_LIMIT)
    return torch._dynamo.config.patch(cache_size_limit=limit)


def compile_available() -> bool:
    """Whether torch.compile can build GPU kernels here (Inductor needs Triton for CUDA)."""
    return importlib.util.find_spec("triton") is not None


def best_attention_backend(device: torch.device) -> str:
    """cuDNN SDPA on NVIDIA GPUs (the fastest attention available without extra packages), native elsewhere."""
    if device.type == "cuda" and torch.backends.cudnn.is_available():
        return "_native_cudnn"
    return "native"


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    transformer.set_attention_backend(backend)
    logger.info("FLUX.1 attention backend: %s", backend)
