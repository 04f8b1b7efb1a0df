"""Speed options and the prepared runner: a structural clone of the transformer (sharing its tensors) on
which fp8 matmul, attention backend and regional compile are applied, so the loaded model itself is never
changed and other graph branches keep working."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .compile import best_attention_backend, compile_blocks, set_attention_backend
from .fp8_linear import (
    FP8_ACTIVATIONS,
    FP8_SCALINGS,
    calibrated_linears,
    fp8_matmul_supported,
    freeze_calibration,
    quantize_transformer_linears,
    start_calibration,
)
from .offload import BlockOffloader
from .runner import FluxRunner
from .step_cache import StepCacheConfig

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "native", "cudnn", "flash", "efficient", "math")
_BACKENDS = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
             "efficient": "_native_efficient", "math": "_native_math"}
_CALIBRATED_OFFLOAD = ("calibrated fp8 activations cannot be combined with block offload (streaming swaps each "
                       "block's tensors for host copies, losing the measured scales); use dynamic activations")


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False
    attention: str = "auto"
    fp8_matmul: bool = False
    cache: StepCacheConfig | None = None
    fp8_scaling: str = "rowwise"  # "tensorwise": faster GEMM, one scale per tensor (see fp8_linear)
    fp8_fast_accum: bool = True  # _scaled_mm's fast accumulation (GPU only): 5 % faster, same final-latent error
    fp8_activations: str = "dynamic"  # "calibrated": static scales measured on the first step of each run
    tune_kernels: bool = False  # Inductor kernel tuning while compiling (slower first run)
    offload_resident_blocks: int = -1  # -1: all blocks on the GPU; N >= 0: first N resident, the rest streamed

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"fp8_scaling must be one of {FP8_SCALINGS}, got {self.fp8_scaling!r}")
        if self.fp8_activations not in FP8_ACTIVATIONS:
            raise ValueError(f"fp8_activations must be one of {FP8_ACTIVATIONS}, got {self.fp8_activations!r}")
        if self.offload_resident_blocks < -1:
            raise ValueError("offload_resident_blocks must be -1 (off: the whole model on the GPU) or the number of "
                             f"blocks to keep on the GPU (0 or more), got {self.offload_resident_blocks}")
        if self.offload and self.fp8_matmul and self.fp8_activations == "calibrated":
            raise ValueError(_CALIBRATED_OFFLOAD)

    @property
    def offload(self) -> bool:
        return self.offload_resident_blocks >= 0


class CalibratingRunner(FluxRunner):
    """A FluxRunner for models with calibrated fp8 linears: each sampling run (`begin`) measures activation
    amax during its first step (all calls at the first timestep, so both CFG streams count) and freezes the
    static scales when the next timestep arrives. A run of one step simply stays on dynamic scales."""

    def __init__(self, transformer: torch.nn.Module, cache: StepCacheConfig | None = None) -> None:
        super().__init__(transformer, cache)
        self._restart_calibration()

    def _restart_calibration(self) -> None:
        start_calibration(self.transformer)
        self._calibration_timestep: float | None = None
        self.calibrating = True

    def begin(self, sigmas: torch.Tensor) -> None:
        super().begin(sigmas)
        self._restart_calibration()

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, *args, **kwargs):
        if self.calibrating:
            value = float(timestep.detach().flatten()[0])
            if self._calibration_timestep is None:
                self._calibration_timestep = value
            elif value != self._calibration_timestep:
                freeze_calibration(self.transformer)
                self.calibrating = False
        return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, *args, **kwargs)


def make_runner(model: torch.nn.Module, cache: StepCacheConfig | None = None, offloader=None) -> FluxRunner:
    """CalibratingRunner when `model` has calibrated fp8 linears (they need one), else FluxRunner. Block
    offload is refused with them: it swaps each block's tensors for host copies, losing measured amaxes."""
    if not calibrated_linears(model):
        return FluxRunner(model, cache, offloader)
    if offloader is not None:
        raise ValueError(_CALIBRATED_OFFLOAD)
    return CalibratingRunner(model, cache)


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
    blocks' code and guards, so later prompts reuse the compiled blocks instead of recompiling. Calibrated
    fp8 scales live in this runner's own linears, so they never outlive the run.

    With `options.offload` the host has left the blocks in CPU memory (only the embedders and output layers on
    `device`); the offloader is built last, over the blocks the runner will call (fp8 ones when quantised, so
    the smaller fp8 copies are what is streamed). Call `runner.offloader.close()` when the run ends."""
    model = transformer
    if options.compile or options.fp8_matmul or device.type == "cuda" or options.attention != "auto":
        model = clone_structure(transformer)
        backend = best_attention_backend(device) if options.attention == "auto" else _BACKENDS[options.attention]
        set_attention_backend(model, backend)
    if options.fp8_matmul:
        if fp8_matmul_supported(device):
            quantize_transformer_linears(model, compute_dtype, scaling=options.fp8_scaling,
                                         fast_accum=options.fp8_fast_accum, activations=options.fp8_activations,
                                         work_device=device)
        else:
            logger.warning("fp8 matmul needs an Ada/Hopper-class NVIDIA GPU; using %s matmul", compute_dtype)
    if options.compile:
        if device.type == "cuda":
            compile_blocks(model, tune_kernels=options.tune_kernels)
        else:
            logger.info("torch.compile is skipped on the CPU (compile time outweighs the gain)")
    offloader = None
    if options.offload:
        if calibrated_linears(model):
            raise ValueError(_CALIBRATED_OFFLOAD)  # before the offloader moves any block
        offloader = BlockOffloader(transformer_blocks(model), device, resident=options.offload_resident_blocks)
    return make_runner(model, options.cache, offloader)


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The double then single blocks, in the order FluxRunner calls them (the order BlockOffloader prefetches)."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
