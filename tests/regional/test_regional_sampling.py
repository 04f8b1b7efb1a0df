"""Regional prompts through the FluxWorks Sampler's own path (`sample_prepared`) on tiny random weights, fp32:
a region covering the whole image with the global prompt's text equals the plain prompt; with the mask off (empty
window) the result equals the unmasked sampler on the same concatenated text; the mask reaches only the chosen
blocks, only on the positive pass, and works with the step cache, block offload hooks and ControlNet residuals."""

from unittest import mock

import pytest
import torch

from devtools.tiny_models import random_flux
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, get_sigmas
from fluxworks.flux_sampler.control import ControlResiduals
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_sampler.regional import RegionalConditioning, RegionalSettings
from fluxworks.flux_speed.prepare import SpeedOptions
from fluxworks.flux_speed.step_cache import StepCacheConfig
from tests.node_path import sample_node_path
from tests.parity.conftest import rel_err

SHAPE, STEPS = (2, 16, 8, 8), 6  # 4x4 image tokens
PARITY = 3e-7  # measured 9.6e-8 (one region over everything: softmax rows with extra masked zeros); 0 with the mask off


@pytest.fixture(scope="module")
def model():
    return random_flux("dev", 0)  # 1 double + 2 single blocks


def prompt(seed: int, length: int = 6) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(torch.randn(1, length, 64, generator=g), torch.randn(1, 64, generator=g))


def quarter_masks() -> tuple[torch.Tensor, torch.Tensor]:
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :32], right[:, 32:] = 1, 1
    return left, right


def run(model, positive, negative=None, curve=None, options=None):
    x, _, prepared = sample_node_path(model, True, positive, negative, torch.zeros(SHAPE), make_noise(SHAPE, 3),
                                      get_sigmas(STEPS, 0.9), curve or GuidanceCurve.constant(3.5), options=options,
                                      return_prepared=True)
    return x


def test_one_region_over_everything_with_the_same_prompt_is_the_plain_prompt(model):
    p = prompt(1)
    regional = RegionalConditioning.build(p, [(p, torch.ones(64, 64), 1.0)])
    assert rel_err(run(model, regional), run(model, p)) <= PARITY


def test_mask_off_equals_the_unmasked_sampler_on_the_same_text(model):
    g, a, b = prompt(1), prompt(2, 4), prompt(3, 5)
    left, right = quarter_masks()
    off = RegionalConditioning.build(g, [(a, left, 1.0), (b, right, 1.0)], RegionalSettings(0.0, 0.0, blocks=()))
    joined = TextConditioning(torch.cat([g.embeds, a.embeds, b.embeds], 1), g.pooled)
    assert rel_err(run(model, off), run(model, joined)) <= PARITY
    on = RegionalConditioning.build(g, [(a, left, 1.0), (b, right, 1.0)])
    assert rel_err(run(model, on), run(model, joined)) > 1e-3  # the mask does change the result


def test_negative_pass_and_unchosen_blocks_are_unmasked(model):
    g, a = prompt(1), prompt(2)
    left, _ = quarter_masks()
    seen = []
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    original = FluxAttnProcessor.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        seen.append((encoder_hidden_states is not None, attention_mask is not None,
                     (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]))
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    cond = RegionalConditioning.build(g, [(a, left, 1.0)], RegionalSettings(0.0, 0.5, blocks="single"))
    curve = GuidanceCurve(3.5, 3.5, cfg_scale=2.0)
    with mock.patch.object(FluxAttnProcessor, "__call__", spy):
        run(model, cond, negative=prompt(4), curve=curve)
    calls_per_pass = 3  # 1 double + 2 single blocks
    passes = [seen[i:i + calls_per_pass] for i in range(0, len(seen), calls_per_pass)]
    assert len(passes) == 2 * STEPS  # positive and negative each step
    for step in range(STEPS):
        positive, negative = passes[2 * step], passes[2 * step + 1]
        in_window = step / (STEPS - 1) <= 0.5
        assert [masked for _, masked, _ in positive] == [False, in_window, in_window]
        assert not any(masked for _, masked, _ in negative)


def test_strength_changes_the_result_and_stays_finite(model):
    g, a = prompt(1), prompt(2)
    left, _ = quarter_masks()
    one = run(model, RegionalConditioning.build(g, [(a, left, 1.0)]))
    strong = run(model, RegionalConditioning.build(g, [(a, left, 3.0)]))
    assert torch.isfinite(strong).all() and rel_err(strong, one) > 1e-4


def test_with_step_cache_and_controlnet_residuals(model):
    g, a, b = prompt(1), prompt(2, 4), prompt(3, 5)
    left, right = quarter_masks()
    cond = RegionalConditioning.build(g, [(a, left, 1.0), (b, right, 1.0)])
    cache = SpeedOptions(cache=StepCacheConfig(threshold=0.0))  # hooks on, never reuses: exact
    assert rel_err(run(model, cond, options=cache), run(model, cond)) <= PARITY
    texts = []

    def controls(inputs, guidance, step, steps):
        texts.append(inputs["encoder_hidden_states"].shape[1])
        zeros = torch.zeros(SHAPE[0], 16, 256)  # (B, image tokens, hidden width)
        return ControlResiduals([zeros], None)

    x, _ = sample_node_path(model, True, cond, None, torch.zeros(SHAPE), make_noise(SHAPE, 3), get_sigmas(STEPS, 0.9),
                            GuidanceCurve.constant(3.5), controls=controls)
    assert texts == [g.embeds.shape[1]] * STEPS  # ControlNets see the global prompt only
    assert rel_err(x, run(model, cond)) <= PARITY  # zero residuals change nothing
