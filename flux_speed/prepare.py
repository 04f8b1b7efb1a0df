"""Speed options and the prepared runner: a structural clone of the transformer (sharing its tensors) on
which fp8 matmul, attention backend and regional compile are applied, so the loaded model itself is never
changed and other graph branches keep working."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .compile import best_attention_backend, compile_blocks, set_attention_backend
from .fp8_linear import FP8_SCALINGS, fp8_matmul_supported, quantize_transformer_linears
from .runner import FluxRunner
from .step_cache import StepCacheConfig

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "native", "cudnn", "flash", "efficient", "math")
_BACKENDS = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
             "efficient": "_native_efficient", "math": "_native_math"}


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False
    attention: str = "auto"
    fp8_matmul: bool = False
    cache: StepCacheConfig | None = None
    fp8_scaling: str = "rowwise"  # "tensorwise": faster GEMM, one scale per tensor (see fp8_linear)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"fp8_scaling must be one of {FP8_SCALINGS}, got {self.fp8_scaling!r}")


def clone_structure(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree with the same parameters and buffers (no tensor copies); attention processors are
    copied too, since backends are set on them."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: clone_structure(child) if child is not None else None
                    for name, child in module._modules.items()}
    if hasattr(module, "processor"):
        new.processor = copy.copy(module.processor)
    return new


def prepare_runner(transformer: torch.nn.Module, options: SpeedOptions, device: torch.device,
                   compute_dtype: torch.dtype) -> FluxRunner:
    """The runner for one sampling run. Built after the host has loaded (and LoRA-patched) the weights, and
    dropped after the run, so it never holds stale weights; torch.compile's code cache is keyed by the
    blocks' code and guards, so later prompts reuse the compiled blocks instead of recompiling."""
    model = transformer
    if options.compile or options.fp8_matmul or device.type == "cuda" or options.attention != "auto":
        model = clone_structure(transformer)
        backend = best_attention_backend(device) if options.attention == "auto" else _BACKENDS[options.attention]
        set_attention_backend(model, backend)
    if options.fp8_matmul:
        if fp8_matmul_supported(device):
            quantize_transformer_linears(model, compute_dtype, scaling=options.fp8_scaling)
        else:
            logger.warning("fp8 matmul needs an Ada/Hopper-class NVIDIA GPU; using %s matmul", compute_dtype)
    if options.compile:
        if device.type == "cuda":
            compile_blocks(model)
        else:
            logger.info("torch.compile is skipped on the CPU (compile time outweighs the gain)")
    return FluxRunner(model, options.cache)
