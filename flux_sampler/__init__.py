"""Pure-torch FLUX.1 sampling: flow-matching schedules, guidance curves and the Euler loop.

Nothing here imports ComfyUI; the nodes adapt these functions to the host.
"""

from .guidance import CURVE_SHAPES, GuidanceCurve, progress_from_sigma, step_progress
from .sampling import FluxDenoiser, TextConditioning, sample_euler, sample_flux
from .schedule import calculate_mu, get_sigmas, time_shift

__all__ = [
    "CURVE_SHAPES",
    "FluxDenoiser",
    "GuidanceCurve",
    "TextConditioning",
    "progress_from_sigma",
    "step_progress",
    "calculate_mu",
    "get_sigmas",
    "sample_euler",
    "sample_flux",
    "time_shift",
]
