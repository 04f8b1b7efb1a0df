# ruff: noqa: F811 - pytest fixtures imported from tests.lora.conftest are parameters here
"""FluxWorks Regional Prompt and core's region conventions on a CONDITIONING (ConditioningSetMask,
ConditioningSetArea*, ConditioningCombine), read by FluxWorks Sampler: an in-process ComfyUI host on the CPU with
the tiny model; core's own nodes make the conditionings."""

from __future__ import annotations

import logging

import pytest
import torch

from fluxworks.flux_sampler.regional import RegionalConditioning
from fluxworks.flux_sampler.sampling import TextConditioning
from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures
from tests.lora.lora_helpers import conditioning, make_patcher

IMAGE = (64, 64)  # pixels: 8x8 latent, 4x4 tokens


def core(cond: TextConditioning):
    return [[cond.embeds, {"pooled_output": cond.pooled}]]


def read(pack, conditioning_list):
    return pack.nodes.sampler.flux_conditioning(conditioning_list, "positive", 64, image_hw=IMAGE)


def core_nodes():
    import nodes

    return nodes


def test_plain_prompt_stays_plain(pack):
    cond = read(pack, core(conditioning(1)))
    assert type(cond) is TextConditioning


def test_core_set_mask_and_combine(pack, caplog):
    n = core_nodes()
    g, a = core(conditioning(1)), core(conditioning(2))
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1  # left half, at half the image size
    (region,) = n.ConditioningSetMask().append(a, mask, "default", 2.0)
    (combined,) = n.ConditioningCombine().combine(g, region)
    with caplog.at_level(logging.INFO):
        cond = read(pack, combined)
    assert "mask is 32x32, resized to the 64x64 image" in caplog.text
    assert isinstance(cond, RegionalConditioning)
    assert cond.strengths == (2.0,) and cond.global_length == 8 and cond.region_lengths == (8,)
    assert cond.region_tokens(8, 8).reshape(4, 4)[:, :2].all() and not cond.region_tokens(8, 8).reshape(4, 4)[:, 2:].any()


def test_mask_bounds_becomes_the_bounding_box(pack):
    n = core_nodes()
    mask = torch.zeros(1, 64, 64)
    mask[0, 0:8, 0:8] = 1
    mask[0, 40:48, 40:48] = 1
    (region,) = n.ConditioningSetMask().append(core(conditioning(2)), mask, "mask bounds", 1.0)
    (combined,) = n.ConditioningCombine().combine(core(conditioning(1)), region)
    cond = read(pack, combined)
    assert cond.masks[0, 0:48, 0:48].all() and cond.masks.sum() == 48 * 48


def test_core_set_area_and_percentage(pack):
    n = core_nodes()
    (pixels,) = n.ConditioningSetArea().append(core(conditioning(2)), 32, 64, 32, 0, 1.0)  # right half
    (percent,) = n.ConditioningSetAreaPercentage().append(core(conditioning(3)), 0.5, 0.5, 0.0, 0.0, 0.5)
    (combined,) = n.ConditioningCombine().combine(core(conditioning(1)), pixels)
    (combined,) = n.ConditioningCombine().combine(combined, percent)
    cond = read(pack, combined)
    tokens = cond.region_tokens(8, 8).reshape(2, 4, 4)
    assert tokens[0][:, 2:].all() and not tokens[0][:, :2].any()
    assert tokens[1][:2, :2].all() and tokens[1].sum() == 4
    assert cond.strengths == (1.0, 0.5)


def test_bad_regions_are_refused_by_name(pack):
    n = core_nodes()
    g = core(conditioning(1))
    (empty,) = n.ConditioningSetMask().append(core(conditioning(2)), torch.zeros(1, 64, 64), "default", 1.0)
    with pytest.raises(ValueError, match="entry 2's mask is empty"):
        read(pack, n.ConditioningCombine().combine(g, empty)[0])
    (two,) = n.ConditioningCombine().combine(g, core(conditioning(2)))
    with pytest.raises(ValueError, match="2 prompts without a mask or area.*Concat"):
        read(pack, two)
    small = torch.zeros(1, 64, 64)
    small[0, :4, :4] = 1
    (tiny,) = n.ConditioningSetMask().append(core(conditioning(2)), small, "default", 1.0)
    cond = read(pack, n.ConditioningCombine().combine(g, tiny)[0])
    with pytest.raises(ValueError, match="cover no 16x16-pixel token"):
        cond.region_tokens(8, 8)
    (left,) = n.ConditioningSetArea().append(core(conditioning(2)), 32, 64, 0, 0, 1.0)
    with pytest.raises(ValueError, match="no global prompt.*uncovered"):
        read(pack, left)
    (zero,) = n.ConditioningSetArea().append(core(conditioning(2)), 32, 64, 0, 0, 0.0)
    assert type(read(pack, n.ConditioningCombine().combine(g, zero)[0])) is TextConditioning  # dropped as in core


def test_too_many_tokens_are_refused(pack):
    n = core_nodes()
    long = TextConditioning(torch.zeros(1, 1100, 64), torch.zeros(1, 64))
    combined = core(conditioning(1))
    for _ in range(4):
        (region,) = n.ConditioningSetArea().append(core(long), 32, 64, 0, 0, 1.0)
        (combined,) = n.ConditioningCombine().combine(combined, region)
    with pytest.raises(ValueError, match="4 regions make 4408 T5 tokens.*fewer regions or a shorter"):
        read(pack, combined)


def test_regional_prompt_node_rows_slots_and_errors(pack):
    node = pack.nodes.regional.FluxWorksRegionalPrompt()
    g = core(conditioning(1))
    mask = torch.zeros(1, 64, 64)
    mask[0, 32:, :] = 1
    rows = '[{"prompt": "", "x": 0, "y": 0, "w": 0.5, "h": 1, "strength": 1.5}, {"x": 0, "y": 0, "w": 1, "h": 1}]'
    (out,) = node.build(g, rows, 0.0, 0.5, "double", conditioning_1=core(conditioning(2)),
                        conditioning_2=core(conditioning(3)), mask_2=mask)
    assert len(out) == 3 and out[1][1]["area"] == ("percentage", 1.0, 0.5, 0.0, 0.0)
    cond = read(pack, out)
    assert cond.settings.end_percent == 0.5 and cond.settings.blocks == "double"
    assert cond.strengths == (1.5, 1.0)
    tokens = cond.region_tokens(8, 8).reshape(2, 4, 4)
    assert tokens[0][:, :2].all() and tokens[0].sum() == 8 and tokens[1][2:].all() and tokens[1].sum() == 8
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        node.build(g, '[{"prompt": " "}]', 0.0, 1.0, "all")
    with pytest.raises(ValueError, match="row 1 has prompt text but no text_encoder"):
        node.build(g, '[{"prompt": "a red circle"}]', 0.0, 1.0, "all")
    with pytest.raises(ValueError, match="row 1: the rectangle"):
        node.build(g, '[{"prompt": "x", "x": 0.8, "w": 0.5}]', 0.0, 1.0, "all")
    with pytest.raises(ValueError, match="not valid JSON"):
        node.build(g, "[{", 0.0, 1.0, "all")
    with pytest.raises(ValueError, match="mask_2 is connected but regions has only 1 rows"):
        node.build(g, '[{"prompt": "x"}]', 0.0, 1.0, "all", conditioning_1=g, mask_2=mask)


def test_sampler_node_samples_regions_without_nan(pack, flux):  # noqa: F811
    n = core_nodes()
    node = pack.nodes.regional.FluxWorksRegionalPrompt()
    rows = '[{"x": 0, "y": 0, "w": 0.5, "h": 1}, {"x": 0.5, "y": 0, "w": 0.5, "h": 1}]'
    (positive,) = node.build(core(conditioning(1)), rows, 0.0, 1.0, "all", conditioning_1=core(conditioning(2)),
                             conditioning_2=core(conditioning(3)))
    sampler = pack.nodes.sampler.FluxWorksSampler()
    settings = dict(seed=3, steps=2, guidance=3.5, shift=0.0, denoise=1.0)
    patcher = make_patcher(pack, flux)
    (out,) = sampler.sample(patcher, positive, {"samples": torch.zeros(1, 16, 8, 8)}, **settings)
    (plain,) = sampler.sample(patcher, core(conditioning(1)), {"samples": torch.zeros(1, 16, 8, 8)}, **settings)
    assert torch.isfinite(out["samples"]).all() and not torch.equal(out["samples"], plain["samples"])
    (negative_regions,) = n.ConditioningCombine().combine(core(conditioning(1)), core(conditioning(2)))
    with pytest.raises(ValueError, match="negative conditioning holds 2 prompts"):
        sampler.sample(patcher, positive, {"samples": torch.zeros(1, 16, 8, 8)}, negative=negative_regions,
                       **settings)
