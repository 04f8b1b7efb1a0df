# ruff: noqa: F811 - pytest fixtures imported from tests.lora.conftest are parameters here
"""Issue 12's bad inputs and parity through the nodes a workflow runs: FluxWorks Regional Prompt's output sampled by
FluxWorks Sampler (in-process ComfyUI host, CPU, tiny random FLUX.1, fp32). Every bad input either gives an error
naming the row / input and the fix, or a documented behaviour (docs/regional.md, "Bad input"), and never a NaN.

- a mask of another size than the image: resized bilinearly, logged;
- an all-zero mask: error "mask is empty";
- a mask or rectangle that covers no 16x16-pixel token: error naming the region ("draw them larger");
- more regions than the budget: more than 8 rows is refused by the node; more than 4096 T5 tokens in all by the
  sampler ("fewer regions or a shorter max_sequence_length");
- a row with an empty prompt: error naming the row (type one, connect conditioning_i, or switch the row off);
- a row switched off or of strength 0: left out (strength 0 is logged); no row on: the global prompt alone.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fluxworks.flux_sampler.sampling import TextConditioning
from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures
from tests.lora.lora_helpers import conditioning, make_patcher

LATENT = (1, 16, 8, 8)  # 64x64 pixels: 4x4 tokens
SETTINGS = dict(seed=3, steps=3, guidance=3.5, shift=0.0, denoise=1.0)
# Measured 1.1e-7: one region over the whole image with the global prompt's own text (the softmax rows only gain
# masked-out columns); 3x that, well inside the 1e-4.
PARITY = 3e-7


def core(cond: TextConditioning):
    return [[cond.embeds, {"pooled_output": cond.pooled}]]


def rows(*boxes: dict) -> str:
    return json.dumps(list(boxes))


@pytest.fixture(scope="module")
def patcher(pack, flux):
    return make_patcher(pack, flux)


def regional(pack, regions: str, **slots):
    node = pack.nodes.regional.FluxWorksRegionalPrompt()
    (out,) = node.build(core(conditioning(1)), regions, 0.0, 1.0, "all", **slots)
    return out


def sample(pack, patcher, positive) -> torch.Tensor:
    (out,) = pack.nodes.sampler.FluxWorksSampler().sample(patcher, positive, {"samples": torch.zeros(LATENT)},
                                                           **SETTINGS)
    return out["samples"]


def test_one_region_over_the_whole_image_equals_the_plain_prompt(pack, patcher):
    plain = sample(pack, patcher, core(conditioning(1)))
    whole = regional(pack, rows({"x": 0, "y": 0, "w": 1, "h": 1}), conditioning_1=core(conditioning(1)))
    got = sample(pack, patcher, whole)
    err = float((got - plain).norm() / plain.norm())
    assert err <= PARITY, f"one whole-image region vs the plain prompt: {err:.2e}"
    other = regional(pack, rows({"x": 0, "y": 0, "w": 1, "h": 1}), conditioning_1=core(conditioning(2)))
    assert float((sample(pack, patcher, other) - plain).norm() / plain.norm()) > 1e-3  # the region's text counts


def test_mask_of_another_size_is_resized_and_logged(pack, patcher, caplog):
    mask = torch.zeros(1, 24, 40)  # neither the image's size nor its aspect
    mask[:, :, :20] = 1
    positive = regional(pack, rows({}), conditioning_1=core(conditioning(2)), mask_1=mask)
    with caplog.at_level(logging.INFO):
        out = sample(pack, patcher, positive)
    assert "mask is 40x24, resized to the 64x64 image" in caplog.text
    assert torch.isfinite(out).all()


def test_empty_mask_is_refused_by_name(pack, patcher):
    positive = regional(pack, rows({}), conditioning_1=core(conditioning(2)), mask_1=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="entry 2's mask is empty.*paint the region"):
        sample(pack, patcher, positive)


@pytest.mark.parametrize("how", ["mask", "rectangle"])
def test_region_covering_no_token_is_refused_by_name(pack, patcher, how):
    if how == "mask":
        mask = torch.zeros(1, 64, 64)
        mask[:, :6, :6] = 1  # 36 pixels: under half of one 16x16 token
        positive = regional(pack, rows({}), conditioning_1=core(conditioning(2)), mask_1=mask)
    else:
        positive = regional(pack, rows({"x": 0.5, "y": 0.5, "w": 0.1, "h": 0.1}),
                            conditioning_1=core(conditioning(2)))
    with pytest.raises(ValueError, match=r"region\(s\) \[1\] cover no 16x16-pixel token.*draw them larger"):
        sample(pack, patcher, positive)


def test_more_regions_than_the_budget_are_refused(pack, patcher):
    with pytest.raises(ValueError, match="regions has 9 rows; at most 8"):
        regional(pack, rows(*[{"prompt": "x"}] * 9))
    long = core(TextConditioning(torch.zeros(1, 1100, 64), torch.zeros(1, 64)))
    positive = regional(pack, rows(*[{"x": 0, "y": 0, "w": 0.5, "h": 1}] * 4),
                        **{f"conditioning_{i}": long for i in range(1, 5)})
    with pytest.raises(ValueError, match="4 regions make 4408 T5 tokens.*fewer regions or a shorter "
                                         "max_sequence_length"):
        sample(pack, patcher, positive)


def test_empty_region_prompt_is_refused_by_row(pack):
    with pytest.raises(ValueError, match="row 2 has an empty prompt: type one, connect conditioning_2, or switch "
                                         "the row off"):
        regional(pack, rows({"prompt": "a"}, {"prompt": "  "}), conditioning_1=core(conditioning(2)))


def test_rows_off_or_of_strength_zero_are_left_out(pack, patcher, caplog):
    plain = sample(pack, patcher, core(conditioning(1)))
    off = regional(pack, rows({"prompt": "", "on": False}))
    assert len(off) == 1 and torch.equal(sample(pack, patcher, off), plain)
    zero = regional(pack, rows({"x": 0, "y": 0, "w": 0.5, "h": 1, "strength": 0}),
                    conditioning_1=core(conditioning(2)))
    with caplog.at_level(logging.INFO):
        out = sample(pack, patcher, zero)
    assert "has strength 0 and is left out" in caplog.text
    assert torch.equal(out, plain)


def test_overlapping_strong_regions_stay_finite(pack, patcher):
    positive = regional(pack, rows({"x": 0, "y": 0, "w": 0.75, "h": 1, "strength": 10},
                                   {"x": 0.25, "y": 0, "w": 0.75, "h": 1, "strength": 0.01}),
                        conditioning_1=core(conditioning(2)), conditioning_2=core(conditioning(3)))
    assert torch.isfinite(sample(pack, patcher, positive)).all()
