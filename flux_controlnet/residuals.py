"""ControlNet residuals for one sampling step: start/end gating, token masks, strength, and the sum of several
controls, expanded to the transformer's depth. A `ControlStack` is the sampler's `StepControl`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..flux_sampler.control import ControlResiduals
from ..flux_sampler.progress import StepPosition
from .model import FluxControlNet, check_batch


def step_active(start: float, end: float, step: int, steps: int) -> bool:
    """Step `step` (0-based) of `steps` runs a control when its whole span [step/steps, (step+1)/steps] lies in
    [start, end]: the rule of diffusers' `control_guidance_start` / `control_guidance_end`."""
    return StepPosition(step, steps).inside_span(start, end)


def block_indices(depth: int, count: int, cyclic: bool) -> list[int]:
    """Which of `count` control residuals each of `depth` transformer blocks receives: spread evenly in runs
    of ceil(depth / count) (InstantX) or repeated cyclically (XLabs, MistoLine)."""
    if cyclic:
        return [i % count for i in range(depth)]
    interval = math.ceil(depth / count)
    return [i // interval for i in range(depth)]


@dataclass(frozen=True)
class ControlUnit:
    """One applied ControlNet: its prepared control input and how strongly, when and where it acts.

    `cond` is the packed control latent (B|1, L, 64, model space) for latent-input nets or the (B|1, 3, H, W)
    image in [-1, 1] for pixel-input nets; `mask` holds per-token weights (B|1, L, 1) in [0, 1] or is None.
    """

    net: FluxControlNet
    cond: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ValueError(f"start and end percent must be within [0, 1], got {self.start} and {self.end}")
        if self.start > self.end:
            raise ValueError(f"start_percent ({self.start}) must not exceed end_percent ({self.end})")
        if not math.isfinite(self.strength):
            raise ValueError(f"strength must be a finite number, got {self.strength}")
        if self.mask is not None and (self.mask.ndim != 3 or self.mask.shape[2] != 1):
            raise ValueError(f"a control mask must be token weights of shape (B, L, 1), got {tuple(self.mask.shape)}")


class ControlStack:
    """The summed residuals of several ControlUnits for a transformer of the given depth and width."""

    def __init__(self, units: Sequence[ControlUnit], transformer_config) -> None:
        self.units = list(units)
        self.num_layers = transformer_config.num_layers
        self.num_single_layers = transformer_config.num_single_layers
        width = transformer_config.num_attention_heads * transformer_config.attention_head_dim
        text_width = transformer_config.joint_attention_dim
        for unit in self.units:
            c = unit.net.config
            if c.inner_dim != width or c.joint_attention_dim != text_width:
                raise ValueError(
                    f"{unit.net.source} ({unit.net.describe()}) has width {c.inner_dim} and text width "
                    f"{c.joint_attention_dim}, but the FLUX.1 model has {width} and {text_width}: "
                    "the ControlNet was made for another model")
        self.evaluations = 0  # ControlNet forward passes, for tests and logs

    def unit_residuals(self, unit: ControlUnit, inputs: dict, guidance: float):
        """(double, single) residuals of one unit, masked, each a list as long as the net's own depth."""
        batch, tokens = inputs["hidden_states"].shape[:2]
        if unit.mask is not None and unit.mask.shape[1] != tokens:
            raise ValueError(f"the control mask covers {unit.mask.shape[1]} tokens but the image has {tokens}")
        if unit.mask is not None:
            check_batch(unit.mask.shape[0], batch, "the control mask")
        double, single = unit.net.residuals(inputs, unit.cond, unit.mode, unit.strength, guidance)
        self.evaluations += 1
        if unit.mask is not None:
            double = None if double is None else [r * unit.mask.to(r) for r in double]
            single = None if single is None else [r * unit.mask.to(r) for r in single]
        return double, single

    def __call__(self, inputs: dict, guidance: float, step: int, steps: int) -> ControlResiduals | None:
        active = [u for u in self.units if step_active(u.start, u.end, step, steps)]
        if not active:
            return None
        dtype = inputs["hidden_states"].dtype
        doubles, singles = [], []
        for unit in active:
            double, single = self.unit_residuals(unit, inputs, guidance)
            doubles.append((double, unit.net.cyclic))
            singles.append((single, unit.net.cyclic))
        return ControlResiduals(_summed(doubles, self.num_layers, dtype), _summed(singles, self.num_single_layers, dtype))


def _summed(per_unit: list[tuple[list[torch.Tensor] | None, bool]], depth: int, dtype: torch.dtype):
    """Sum the units' residuals block by block (in unit order, as diffusers' FluxMultiControlNetModel does);
    blocks that receive the same residuals share one summed tensor."""
    present = [(samples, cyclic) for samples, cyclic in per_unit if samples]
    if not present or depth == 0:
        return None
    indices = [block_indices(depth, len(samples), cyclic) for samples, cyclic in present]
    sums: dict[tuple[int, ...], torch.Tensor] = {}
    out = []
    for block in range(depth):
        key = tuple(idx[block] for idx in indices)
        if key not in sums:
            total = present[0][0][key[0]].to(dtype)
            for (samples, _), i in zip(present[1:], key[1:], strict=True):
                total = total + samples[i].to(dtype)
            sums[key] = total
        out.append(sums[key])
    return out
