"""Speed options and the prepared transformer the FluxWorks Sampler calls.

`prepare` returns a `PreparedTransformer`: diffusers' own `FluxTransformer2DModel` -- the loaded one when no
option changes it, else a structural clone sharing its tensors -- with the speed options applied (attention
backend, fp8 matmul linears, regional compile) and the step cache and block offload attached as diffusers hooks.
The sampler, the benchmarks and the parity tests all call the model it holds through `sample_prepared`, so the
forward that is verified and timed is diffusers' forward, the one users run. The loaded model itself is never
changed, so other graph branches keep working.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..flux_sampler.progress import StepPosition
from ..flux_sampler.regional import RegionalConditioning, attach_mask_router
from ..flux_sampler.sampling import sample_flux
from .compile import best_attention_backend, compile_available, compile_blocks, compile_limits, set_attention_backend
from .fp8_linear import (
    FP8_ACTIVATIONS,
    FP8_SCALINGS,
    calibrated_linears,
    fp8_matmul_supported,
    freeze_calibration,
    quantize_transformer_linears,
    start_calibration,
)
from .interrupt import attach_interrupt_checks
from .offload import BlockOffloader, attach_offload
from .step_cache import StepCacheConfig, StepCacheState, attach_step_cache

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "native", "cudnn", "flash", "efficient", "math")
_BACKENDS = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
             "efficient": "_native_efficient", "math": "_native_math"}
_CALIBRATED_OFFLOAD = ("calibrated fp8 activations cannot be combined with block offload (streaming swaps each "
                       "block's tensors for host copies, losing the measured scales); use dynamic activations")
AUTO_ACTIVATIONS = "auto"  # the Speed node's default fp8_activations choice (activations_for)


def activations_for(choice: str, offload_resident_blocks: int) -> str:
    """The fp8 activation scales a FluxWorks Speed choice means: "auto" is calibrated (fixed scales, no per-call
    reduction) except with block offload (`offload_resident_blocks` >= 0), which cannot keep calibrated scales."""
    if choice != AUTO_ACTIVATIONS:
        return choice
    return "dynamic" if offload_resident_blocks >= 0 else "calibrated"


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

    @classmethod
    def defaults_for(cls, device: torch.device) -> SpeedOptions:
        """What the FluxWorks Sampler runs with no FluxWorks Speed node: on a CUDA GPU with Triton, regional
        compile of the bf16 blocks (eager diffusers is slower than core's native bf16 model; compiled blocks are
        faster, docs/performance.md), lossless and cached across prompts; elsewhere plain diffusers eager."""
        return cls(compile=device.type == "cuda" and compile_available())


@dataclass
class PreparedTransformer:
    """What one sampling run calls: `model` is a diffusers FluxTransformer2DModel (called with diffusers'
    keyword inputs, diffusers' forward), `cache` the step cache's run state (None without a cache), `offloader`
    the block streamer (None without offload). Use `run()` around a sampling run and `evaluation(...)` around
    each transformer call; `sample_prepared` does both."""

    model: torch.nn.Module
    options: SpeedOptions
    cache: StepCacheState | None = None
    offloader: BlockOffloader | None = None
    calibrated: bool = False
    _calibration_step: int | None = None

    @contextlib.contextmanager
    def run(self) -> Iterator[PreparedTransformer]:
        """One sampling run: fresh cache state and fp8 calibration; the compile cache limit raised only inside."""
        if self.cache is not None:
            self.cache.reset()
        if self.calibrated:
            start_calibration(self.model)
            self._calibration_step = None
        with compile_limits() if self.options.compile else contextlib.nullcontext():
            yield self

    @contextlib.contextmanager
    def evaluation(self, position: StepPosition, stream: str) -> Iterator[None]:
        """One transformer call at step `position` for prompt stream `stream` ("positive" / "negative").
        Calibrated fp8 scales are measured on every call of the run's first step and frozen when the next step
        begins (a one-step run simply stays on dynamic scales)."""
        if self.calibrated and self._calibration_step is not None and position.index != self._calibration_step:
            freeze_calibration(self.model)
        if self.calibrated and self._calibration_step is None:
            self._calibration_step = position.index
        if self.cache is None:
            yield
            return
        with self.cache.evaluation(position, stream):
            yield

    def close(self) -> None:
        """End block streaming (hand the streamed blocks back in pageable CPU memory)."""
        if self.offloader is not None:
            self.offloader.close()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def clone_structure(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree with the same parameters and buffers (no tensor copies). Attention processors (backends
    are set on them) and torch's hook tables are the clone's own, so what is set or registered on the clone never
    reaches the loaded model; torch hooks already on the loaded model are kept, diffusers hook registries are not."""
    new = copy.copy(module)
    # A hook registry (diffusers' `_diffusers_hook`, which also rebinds `forward` on the instance) belongs to the
    # module it was made for: a shared one would put the clone's hooks on the loaded model. The clone starts bare.
    if "_diffusers_hook" in module.__dict__:
        del new._diffusers_hook
        new.__dict__.pop("forward", None)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    for name in _HOOK_DICTS:
        if isinstance(getattr(module, name, None), dict):
            setattr(new, name, type(getattr(module, name))(getattr(module, name)))
    new._modules = {name: clone_structure(child) if child is not None else None
                    for name, child in module._modules.items()}
    if hasattr(module, "processor"):
        new.processor = copy.copy(module.processor)
    return new


def prepare(transformer: torch.nn.Module, options: SpeedOptions, device: torch.device,
            compute_dtype: torch.dtype, interrupt: Callable[[], None] | None = None,
            regional: bool = False, parallel: Callable[[torch.nn.Module], None] | None = None
            ) -> PreparedTransformer:
    """The transformer for one sampling run. Built after the host has loaded (and LoRA-patched) the weights, and
    dropped after the run, so it never holds stale weights; torch.compile's code cache is keyed by the blocks'
    code and guards, so later prompts reuse the compiled blocks instead of recompiling. Calibrated fp8 scales live
    in this run's own linears, so they never outlive the run.

    With no option that changes the model (the CPU defaults) the loaded transformer itself is returned, unhooked.
    With `options.offload` the host has left the blocks in CPU memory (only the embedders and output layers on
    `device`); the offloader is built last, over the blocks the model will call (fp8 ones when quantised, so the
    smaller fp8 copies are what is streamed). Hooks: block offload first, then the step cache, so a block the
    cache skips is never fetched. `interrupt` (the host's cancel check, which raises to stop) is called before
    every block and, on the CPU, between pieces of a long block (flux_speed.interrupt), so a cancel is honoured
    within a fraction of a second even when one block takes minutes. Call `close()` when
    the run ends. `regional` attaches the regional-prompt mask router (flux_sampler.regional). `parallel` (a
    FluxWorks Multi-GPU worker's context parallelism, flux_parallel.worker) is applied to the clone once its
    attention backend is set and before compile, so the compiled blocks trace its collectives."""
    needs_clone = (options.compile or options.fp8_matmul or device.type == "cuda" or options.attention != "auto"
                   or options.offload or options.cache is not None or interrupt is not None or regional
                   or parallel is not None)
    if not needs_clone:
        return PreparedTransformer(transformer, options)
    model = clone_structure(transformer)
    backend = best_attention_backend(device) if options.attention == "auto" else _BACKENDS[options.attention]
    if backend != "native" or options.attention != "auto":  # "native" is diffusers' own default: nothing to set
        set_attention_backend(model, backend)
    if parallel is not None:
        parallel(model)
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
    calibrated = bool(calibrated_linears(model))
    if interrupt is not None:
        attach_interrupt_checks(model, interrupt, device)
    if regional:
        attach_mask_router(model)
    offloader = None
    if options.offload:
        if calibrated:
            raise ValueError(_CALIBRATED_OFFLOAD)  # before the offloader moves any block
        offloader = BlockOffloader(transformer_blocks(model), device, resident=options.offload_resident_blocks)
        attach_offload(model, offloader)
    cache = None
    if options.cache is not None:
        cache = attach_step_cache(model, options.cache)
        if cache is None:
            logger.info("step cache: the model has fewer than two blocks, nothing to skip")
        elif offloader is not None:
            cache.on_skip = offloader.skip_pass
    return PreparedTransformer(model, options, cache, offloader, calibrated)


class PreparedSlot:
    """Keeps one PreparedTransformer between sampling runs of the same loaded model, so the next prompt reuses
    its fp8 weights, hooks and compiled blocks instead of quantising 12B weights and re-guarding every compiled
    block again. It is reused only while the key matches: the options, device, dtype, interrupt check and a
    fingerprint of the loaded weights (each tensor's storage, and its in-place version counter where torch keeps one:
    tensors made under inference mode, as ComfyUI's LoRA merges are, have none) plus the caller's `weights_tag`
    (the host passes its record of which weight patches are merged, which changes with every merge and unmerge,
    in-place ones included). Block offload is never kept (its streaming state belongs to one run). The
    model's owner calls `release()` when the weights leave the device (the host's patcher does it on unpatch), so
    the fp8 copies never outlive the loaded model."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.prepared: PreparedTransformer | None = None

    @staticmethod
    def fingerprint(transformer: torch.nn.Module) -> tuple:
        tensors = list(transformer.parameters()) + list(transformer.buffers())
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)

    def get(self, transformer: torch.nn.Module, options: SpeedOptions, device: torch.device,
            compute_dtype: torch.dtype, interrupt: Callable[[], None] | None,
            weights_tag: object = None, regional: bool = False,
            parallel: Callable[[torch.nn.Module], None] | None = None) -> PreparedTransformer:
        if options.offload:
            self.release()
            return prepare(transformer, options, device, compute_dtype, interrupt, regional, parallel)
        key = (options, str(device), compute_dtype, interrupt, regional, parallel is not None, weights_tag,
               self.fingerprint(transformer))
        if self.prepared is None or key != self.key:
            self.release()
            self.prepared = prepare(transformer, options, device, compute_dtype, interrupt, regional, parallel)
            self.key = key
        return self.prepared

    def release(self) -> None:
        if self.prepared is not None:
            self.prepared.close()
        self.key = self.prepared = None


def sample_prepared(transformer: torch.nn.Module, options: SpeedOptions, device: torch.device,
                    compute_dtype: torch.dtype, interrupt: Callable[[], None] | None = None,
                    slot: PreparedSlot | None = None, weights_tag: object = None,
                    parallel: Callable[[torch.nn.Module], None] | None = None, **sample_args):
    """Prepare `transformer` with `options` (or reuse what `slot` kept from the last run) and run `sample_flux`
    on it (keyword arguments as sample_flux takes, without `transformer` and `compute_dtype`): what the FluxWorks
    Sampler node runs once the host has loaded the weights and made the conditioning, and what the parity tests
    and benchmarks call. Returns (model-space latent, denoiser, prepared)."""
    regional = isinstance(sample_args.get("positive"), RegionalConditioning)
    if slot is not None:
        prepared = slot.get(transformer, options, device, compute_dtype, interrupt, weights_tag, regional, parallel)
    else:
        prepared = prepare(transformer, options, device, compute_dtype, interrupt, regional, parallel)
    kept = slot is not None and slot.prepared is prepared
    try:
        with prepared.run():
            x, denoiser = sample_flux(prepared.model, compute_dtype=compute_dtype, scope=prepared.evaluation,
                                      **sample_args)
    except BaseException:
        if kept:
            slot.release()  # an interrupted run may leave calibration or streaming half done: start clean
        raise
    finally:
        if not kept:
            prepared.close()
    return x, denoiser, prepared


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The double then single blocks, in the order diffusers' forward calls them (the order BlockOffloader
    prefetches)."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
