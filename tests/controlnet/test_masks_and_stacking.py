"""Token masks on the residual tensors themselves, and how several controls add up."""

from __future__ import annotations

import pytest
import torch

from devtools.tiny_controlnets import random_controlnet, tiny_config
from fluxworks.flux_controlnet import (
    ControlStack,
    ControlUnit,
    FluxControlNet,
    block_indices,
    mask_to_tokens,
    pixel_cond,
)
from fluxworks.flux_sampler import FluxDenoiser, GuidanceCurve
from tests.controlnet.conftest import HEIGHT, LATENT_SHAPE, STEPS, WIDTH, control_image, control_latent_tokens, sample


def wrap(kind: str, seed: int, **blocks) -> FluxControlNet:
    return FluxControlNet(random_controlnet(kind, seed, **blocks), tiny_config(kind, **blocks), torch.float32, kind)


@pytest.fixture(scope="module")
def instantx() -> FluxControlNet:
    return wrap("instantx", 71, num_layers=2, num_single_layers=2)


@pytest.fixture(scope="module")
def step_inputs(transformer, prompt, noise):
    """The transformer inputs the denoiser hands its controls (at sigma 0.7)."""
    denoiser = FluxDenoiser(transformer, prompt, None, GuidanceCurve.constant(3.5), STEPS, True)
    return denoiser.transformer_inputs(noise * 0.7, torch.tensor(0.7), prompt, 3.5)


def left_mask() -> torch.Tensor:
    """1 on the left 48 px, a soft ramp to 0 over the next 32 px, 0 on the right 48 px (128 x 128)."""
    columns = torch.ones(WIDTH)
    columns[48:80] = torch.linspace(1.0, 0.0, 34)[1:-1]
    columns[80:] = 0.0
    return columns.expand(1, HEIGHT, WIDTH).clone()


def all_residuals(residuals) -> list[torch.Tensor]:
    return [*residuals.block_samples, *residuals.single_block_samples]


def test_residuals_are_exactly_zero_outside_the_mask_and_unchanged_inside(transformer, vae, instantx, step_inputs):
    weights = mask_to_tokens(left_mask(), *LATENT_SHAPE[2:])  # (1, 64, 1); token columns are 16 px wide
    columns = weights[0, :, 0].view(8, 8)
    assert torch.all(columns[:, :3] == 1.0) and torch.all(columns[:, 5:] == 0.0)
    assert torch.all((columns[:, 3:5] > 0.0) & (columns[:, 3:5] < 1.0))  # the soft edge stays soft
    cond = control_latent_tokens(vae, control_image(8))
    masked = ControlStack([ControlUnit(instantx, cond, mask=weights)], transformer.config)(step_inputs, 3.5, 1, STEPS)
    free = ControlStack([ControlUnit(instantx, cond)], transformer.config)(step_inputs, 3.5, 1, STEPS)
    outside, inside = weights[0, :, 0] == 0.0, weights[0, :, 0] == 1.0
    partial = ~(outside | inside)
    for with_mask, without in zip(all_residuals(masked), all_residuals(free), strict=True):
        assert torch.count_nonzero(with_mask[:, outside]) == 0
        assert torch.equal(with_mask[:, inside], without[:, inside])
        assert torch.count_nonzero(without[:, outside]) > 0
        torch.testing.assert_close(with_mask[:, partial], without[:, partial] * weights[:, partial])


def test_a_full_mask_equals_no_mask(transformer, prompt, noise, vae, instantx):
    cond = control_latent_tokens(vae, control_image(9))
    full = mask_to_tokens(torch.ones(1, 40, 40), *LATENT_SHAPE[2:])  # any size: it is fitted to the output
    with_mask = sample(transformer, prompt, noise, ControlStack([ControlUnit(instantx, cond, mask=full)], transformer.config))
    without = sample(transformer, prompt, noise, ControlStack([ControlUnit(instantx, cond)], transformer.config))
    assert torch.equal(with_mask, without)


def test_controls_of_different_layouts_add_block_by_block(transformer, vae, instantx, step_inputs):
    """An InstantX net (residuals spread 0, 0, 1) plus an XLabs net (repeated 0, 1, 0) on 3 double blocks."""
    xlabs = wrap("xlabs", 72, num_layers=2, num_single_layers=0)
    units = [ControlUnit(instantx, control_latent_tokens(vae, control_image(10)), strength=0.6),
             ControlUnit(xlabs, pixel_cond(control_image(11)), strength=0.9)]
    stack = ControlStack(units, transformer.config)
    total = stack(step_inputs, 3.5, 0, STEPS)
    (a_double, a_single), (b_double, _) = (stack.unit_residuals(u, step_inputs, 3.5) for u in units)
    assert len(total.block_samples) == 3 and len(total.single_block_samples) == 4
    spread, repeated = block_indices(3, 2, cyclic=False), block_indices(3, 2, cyclic=True)
    assert (spread, repeated) == ([0, 0, 1], [0, 1, 0])
    for block in range(3):
        torch.testing.assert_close(total.block_samples[block], a_double[spread[block]] + b_double[repeated[block]],
                                   rtol=0, atol=0)
    for block, index in enumerate(block_indices(4, 2, cyclic=False)):  # only the InstantX net has single blocks
        assert torch.equal(total.single_block_samples[block], a_single[index])


def test_no_active_control_means_no_residuals_and_no_controlnet_call(transformer, vae, instantx, step_inputs):
    stack = ControlStack([ControlUnit(instantx, control_latent_tokens(vae, control_image(12)), start=0.5, end=1.0)],
                         transformer.config)
    assert stack(step_inputs, 3.5, 1, STEPS) is None
    assert stack.evaluations == 0


def test_a_controlnet_for_another_model_width_is_refused(instantx):
    class Wide:  # the config of a transformer twice as wide
        num_layers, num_single_layers, num_attention_heads, attention_head_dim, joint_attention_dim = 1, 1, 4, 128, 64

    with pytest.raises(ValueError, match="width 256 .* the FLUX.1 model has 512"):
        ControlStack([ControlUnit(instantx, torch.zeros(1, 64, 64))], Wide())


@pytest.mark.parametrize("start,end", [(0.6, 0.4), (-0.1, 1.0), (0.0, 1.5)])
def test_bad_percent_windows_are_refused(instantx, start, end):
    with pytest.raises(ValueError, match="percent"):
        ControlUnit(instantx, torch.zeros(1, 64, 64), start=start, end=end)
