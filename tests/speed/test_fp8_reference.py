"""fp8 matmul through the node path, call by call, against an independent fp8 reference.

`test_speed_modes` compares the fp8 node path with eager fp32 at FP8_TOLERANCE (~3x the fp8 rounding error,
0.003). That bound is the size of fp8 rounding itself, so a bug smaller than fp8 rounding hides under it: dropping
every fp8 linear's bias moves the final latent only 0.008 from eager on the tiny model. Here the reference does the
*same* quantisation, written in this file with plain torch ops (nothing from `flux_speed.fp8_linear`): a copy of
the diffusers model whose block linears hold fake-quantised (quantise to float8_e4m3fn, dequantise) weights and
fake-quantise their inputs, so it differs from the node path only by fp32 rounding. Each transformer call the node
path makes (its inputs and output recorded by a forward hook, which the prepared clone keeps) is replayed through
the reference: what remains is the order of fp32 sums (q/k/v fused in the node path, separate here), ~1e-7 on a
typical call. Now and then an activation lands within fp32 rounding of an fp8 rounding boundary and rounds the other
way on one side (a "flip"); that call then differs by up to ~1e-4, so the typical call (median) and the worst call
(max) have separate bounds. Dropping the fp8 biases moves every call by 0.015.

The two scalings as the fp8 path defines them (facts, see the module docstring of fp8_linear): rowwise = one
absmax scale per weight row and per activation token; tensorwise = one scale per weight and one per activation
tensor, where q/k/v (and the text stream's q/k/v) are fused into one weight first, so they share one scale. The
per-image modulation linears (`norm*.linear`) keep only their weight in fp8 (per row) and see full-precision inputs.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from fluxworks.flux_speed.fp8_linear import FP8_SCALINGS
from fluxworks.flux_speed.prepare import SpeedOptions
from tests.parity.conftest import rel_err
from tests.speed.test_speed_modes import STEPS, cond, eager, fp8_cpu_emulation, model, sample  # noqa: F401

# Relative error of one transformer call, node path vs reference, about 3x the measured value (8 calls, tiny model):
FP8_REFERENCE_TOLERANCE = {"rowwise": 4e-7, "tensorwise": 4e-7}  # median call; measured 1.2e-7 and 1.3e-7
FP8_FLIP_TOLERANCE = {"rowwise": 3e-4, "tensorwise": 6e-6}  # worst call (a flip); measured 8.7e-5 and 1.7e-6
# The reference is fp8: on the same inputs it is this far from the plain fp32 model at least (measured 0.007).
FP8_ROUNDING_FLOOR = 1e-3

E4M3_LARGEST = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FUSED_GROUPS = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))


def fake_fp8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x rounded to float8_e4m3fn on the grid whose largest value is `amax` (broadcast), back in float32."""
    scale = amax.float().clamp_min(1e-12) / E4M3_LARGEST
    return (x.float() / scale).clamp(-E4M3_LARGEST, E4M3_LARGEST).to(torch.float8_e4m3fn).float() * scale


def _quantise_input(rowwise: bool):
    def hook(module, args):
        x = args[0]
        amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
        return (fake_fp8(x, amax).to(x.dtype), *args[1:])
    return hook


@torch.no_grad()
def fp8_reference(transformer: torch.nn.Module, scaling: str) -> torch.nn.Module:
    """A copy of `transformer` computing what fp8 matmul with `scaling` should compute, in plain float32."""
    reference = copy.deepcopy(transformer)
    rowwise = scaling == "rowwise"
    for block in [*reference.transformer_blocks, *reference.single_transformer_blocks]:
        linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        fused = [g for g in FUSED_GROUPS if g[0] in linears]
        groups = fused + [(name,) for name in linears if not any(name in g for g in fused)]
        for group in groups:
            weights = [linears[name].weight for name in group]
            shared = torch.stack([w.abs().amax() for w in weights]).amax()
            for name, weight in zip(group, weights, strict=True):
                modulation = "norm" in name
                per_row = rowwise or modulation
                weight.copy_(fake_fp8(weight, weight.abs().amax(dim=1, keepdim=True) if per_row else shared))
                if not modulation:
                    linears[name].register_forward_pre_hook(_quantise_input(rowwise))
    return reference


class CallRecorder:
    """Records the keyword inputs and the output of every call of a transformer (a forward hook with kwargs, kept by
    the prepared clone); removes the hook on exit."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.calls: list[tuple[dict, torch.Tensor]] = []

    def _record(self, module, args, kwargs, output):
        inputs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.calls.append((inputs, output[0].detach().clone()))

    def __enter__(self) -> CallRecorder:
        self.handle = self.transformer.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@torch.no_grad()
def fp8_call_errors(transformer, conditioning, scaling: str) -> list[float]:
    """Relative error of each transformer call of an fp8 sampling run through the node path (CPU emulation of
    the GPU's fp8 arithmetic), against `fp8_reference` called on the same inputs."""
    with fp8_cpu_emulation(), CallRecorder(transformer) as recorder:
        sample(transformer, conditioning, options=SpeedOptions(fp8_matmul=True, fp8_scaling=scaling))
    reference = fp8_reference(transformer, scaling)
    return [rel_err(output, reference(**inputs)[0]) for inputs, output in recorder.calls]


@pytest.mark.parametrize("scaling", FP8_SCALINGS)
def test_every_fp8_call_matches_an_independent_fp8_reference(model, cond, scaling):  # noqa: F811
    errors = fp8_call_errors(model, cond, scaling)
    assert len(errors) == STEPS
    assert statistics.median(errors) < FP8_REFERENCE_TOLERANCE[scaling]
    assert max(errors) < FP8_FLIP_TOLERANCE[scaling]


@pytest.mark.parametrize("scaling", FP8_SCALINGS)
@torch.no_grad()
def test_the_fp8_reference_is_not_the_fp32_model(model, cond, scaling):  # noqa: F811
    """The reference really rounds to fp8: on the same inputs it is as far from fp32 as fp8 rounding goes, so
    matching it is a claim about the fp8 arithmetic (and it is not the fp32 model under another name)."""
    with CallRecorder(model) as recorder:
        eager(model, cond)
    reference = fp8_reference(model, scaling)
    inputs, fp32_output = recorder.calls[0]
    assert rel_err(reference(**inputs)[0], fp32_output) > FP8_ROUNDING_FLOOR
