"""FluxWorksGuidanceSchedule (a guidance curve) and FluxWorksScheduleCoreModel (that curve on a core MODEL)."""

from __future__ import annotations

from ..flux_sampler.guidance import CURVE_SHAPES, GuidanceCurve, progress_from_sigma
from . import host

_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.01}


class FluxWorksGuidanceSchedule:
    @classmethod
    def INPUT_TYPES(cls):
        value = {"min": 0.0, "max": 100.0, "step": 0.1}
        return {
            "required": {
                "start_value": ("FLOAT", {"default": 3.5, **value, "tooltip": "Distilled guidance at the start."}),
                "end_value": ("FLOAT", {"default": 3.5, **value, "tooltip": "Distilled guidance at the end."}),
                "shape": (list(CURVE_SHAPES), {"default": "linear"}),
                "start_percent": ("FLOAT", {"default": 0.0, **_PERCENT,
                                            "tooltip": "Progress where the curve leaves start_value."}),
                "end_percent": ("FLOAT", {"default": 1.0, **_PERCENT,
                                          "tooltip": "Progress where the curve reaches end_value."}),
                "cfg_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                        "tooltip": "True CFG with the sampler's negative prompt (1 = off)."}),
                "cfg_start_percent": ("FLOAT", {"default": 0.0, **_PERCENT}),
                "cfg_end_percent": ("FLOAT", {"default": 1.0, **_PERCENT}),
            }
        }

    RETURN_TYPES = (host.FLUX_GUIDANCE,)
    RETURN_NAMES = ("guidance_schedule",)
    FUNCTION = "build"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Distilled guidance as a curve over the steps, plus optional true CFG inside a window. "
                   "Feed it to FluxWorks Sampler or to a core MODEL with FluxWorks Schedule Core Model.")

    def build(self, **values):
        return (GuidanceCurve(**values),)


class FluxWorksScheduleCoreModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "guidance_schedule": (host.FLUX_GUIDANCE,)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Applies a guidance curve to a core FLUX.1 MODEL (UNETLoader), so KSampler and "
                   "SamplerCustomAdvanced use scheduled distilled guidance.")

    def apply(self, model, guidance_schedule: GuidanceCurve):
        if not isinstance(guidance_schedule, GuidanceCurve):
            raise TypeError(f"guidance_schedule must come from FluxWorksGuidanceSchedule, got "
                            f"{type(guidance_schedule).__name__}")
        return (host.schedule_core_guidance(
            model, lambda sigmas, sigma: guidance_schedule.value_at(progress_from_sigma(sigmas, sigma))),)


NODE_CLASS_MAPPINGS = {
    "FluxWorksGuidanceSchedule": FluxWorksGuidanceSchedule,
    "FluxWorksScheduleCoreModel": FluxWorksScheduleCoreModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxWorksGuidanceSchedule": "FluxWorks Guidance Schedule",
    "FluxWorksScheduleCoreModel": "FluxWorks Schedule Core Model",
}
