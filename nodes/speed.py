"""FluxWorksSpeed (compile, fp8 matmul, attention backend) and FluxWorksStepCache (first-block cache)."""

from __future__ import annotations

from dataclasses import replace

from ..flux_speed.fp8_linear import FP8_ACTIVATIONS, FP8_SCALINGS
from ..flux_speed.prepare import ATTENTION_CHOICES, AUTO_ACTIVATIONS, SpeedOptions, activations_for
from ..flux_speed.step_cache import DEFAULT_THRESHOLD, StepCacheConfig
from . import host

OPTIONS_KEY = "fluxworks_speed"
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.01}


def speed_options(patcher) -> SpeedOptions:
    """The options a FLUX_MODEL carries; without a Speed node, `SpeedOptions.defaults_for` its device (nothing
    lossy: regional compile on CUDA GPUs with Triton, eager elsewhere)."""
    carried = patcher.model_options.get("transformer_options", {}).get(OPTIONS_KEY)
    return carried if carried is not None else SpeedOptions.defaults_for(patcher.load_device)


def with_options(patcher, options: SpeedOptions):
    out = patcher.clone()
    out.model_options.setdefault("transformer_options", {})
    out.model_options["transformer_options"] = {**out.model_options["transformer_options"], OPTIONS_KEY: options}
    return out


class FluxWorksSpeed:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.FLUX_MODEL,),
            "compile": ("BOOLEAN", {"default": True, "tooltip": "Regional torch.compile of the repeated blocks "
                                    "(GPU; the first run compiles, later prompts reuse it)."}),
            "fp8_matmul": ("BOOLEAN", {"default": True, "tooltip": "fp8 tensor-core matmul on Ada/Hopper GPUs: "
                                       "faster, small numeric change (see docs/performance.md). Cards without fp8 "
                                       "matmul (and the CPU) keep bf16/fp32 matmul."}),
            "attention": (list(ATTENTION_CHOICES), {"default": "auto",
                                                     "tooltip": "auto: cuDNN attention on NVIDIA GPUs."}),
        }, "optional": {
            "fp8_scaling": (list(FP8_SCALINGS), {"default": "tensorwise", "tooltip": "fp8 matmul scales. "
                            "tensorwise: one per tensor, cuBLAS's fastest fp8 GEMM (bias in its epilogue). rowwise: "
                            "per weight row and per token, for activations whose tokens differ by orders of "
                            "magnitude (docs/performance.md)."}),
            "fp8_fast_accum": ("BOOLEAN", {"default": True, "tooltip": "fp8 matmul with cuBLAS's fast (less "
                               "precise) accumulation, as most fp8 inference engines use. GPU only."}),
            "fp8_activations": ([AUTO_ACTIVATIONS, *FP8_ACTIVATIONS], {
                                "default": AUTO_ACTIVATIONS, "tooltip": "auto: calibrated, or "
                                "dynamic with block offload. dynamic: measure each activation's range at every "
                                "call. calibrated: measure it on the first step of each run, then use fixed scales "
                                "(no per-call reduction)."}),
            "tune_kernels": ("BOOLEAN", {"default": False, "tooltip": "With compile: benchmark Inductor kernel "
                             "configs while compiling (much slower first run, possibly faster steps)."}),
            "offload_resident_blocks": ("INT", {"default": -1, "min": -1, "max": 57, "tooltip": "Block offload "
                                        "for small GPUs. -1: off, the whole model on the GPU. N: keep the first N "
                                        "of FLUX.1's 57 blocks on the GPU and stream the others from CPU memory "
                                        "(slower; fewer = less GPU memory). Not with calibrated fp8 activations."}),
        }}

    RETURN_TYPES = (host.FLUX_MODEL,)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Speed modes for FluxWorks Sampler; the loaded model is not changed for other branches."

    def apply(self, model, compile: bool, fp8_matmul: bool, attention: str, fp8_scaling: str = "tensorwise",
              fp8_fast_accum: bool = True, fp8_activations: str = AUTO_ACTIVATIONS, tune_kernels: bool = False,
              offload_resident_blocks: int = -1):
        patcher = host.expect(model, host.FLUX_MODEL, "FluxWorksSpeed")
        fp8_activations = activations_for(fp8_activations, offload_resident_blocks)
        options = replace(speed_options(patcher), compile=compile, fp8_matmul=fp8_matmul, attention=attention,
                          fp8_scaling=fp8_scaling, fp8_fast_accum=fp8_fast_accum, fp8_activations=fp8_activations,
                          tune_kernels=tune_kernels, offload_resident_blocks=offload_resident_blocks)
        return (with_options(patcher, options),)


class FluxWorksStepCache:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.FLUX_MODEL,),
            "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": "Error budget: reuse the deep blocks' residual from the last full "
                                               "step while the estimated relative change of the final latent "
                                               "(first-block change x measured deep/first change rate x step "
                                               "size, summed over the reused steps) stays below this. Higher = "
                                               "more reuse, faster, further from the uncached image. 0 = off."}),
            "start_percent": ("FLOAT", {"default": StepCacheConfig.start_percent, **_PERCENT,
                                        "tooltip": "No reuse before this share of the steps."}),
            "end_percent": ("FLOAT", {"default": StepCacheConfig.end_percent, **_PERCENT,
                                      "tooltip": "No reuse after this share of the steps."}),
            "max_consecutive": ("INT", {"default": StepCacheConfig.max_consecutive, "min": 1, "max": 100,
                                        "tooltip": "At most this many reused steps in a row."}),
        }}

    RETURN_TYPES = (host.FLUX_MODEL,)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "First-block step cache: skips most of the network on steps that change little."

    def apply(self, model, threshold: float, start_percent: float, end_percent: float, max_consecutive: int):
        patcher = host.expect(model, host.FLUX_MODEL, "FluxWorksStepCache")
        cache = StepCacheConfig(threshold, start_percent, end_percent, max_consecutive)
        return (with_options(patcher, replace(speed_options(patcher), cache=cache)),)


NODE_CLASS_MAPPINGS = {"FluxWorksSpeed": FluxWorksSpeed, "FluxWorksStepCache": FluxWorksStepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxWorksSpeed": "FluxWorks Speed (compile / fp8 / attention)",
                              "FluxWorksStepCache": "FluxWorks Step Cache"}
