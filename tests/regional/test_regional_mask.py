"""The joint-attention mask of regional prompts is what flux_sampler/regional.py's docstring says, cell by cell,
and masks reach the token grid by area average."""

import math

import pytest
import torch

from fluxworks.flux_sampler.regional import RegionalConditioning, RegionalSettings, joint_mask, token_masks
from fluxworks.flux_sampler.sampling import TextConditioning


def test_token_masks_area_average_in_pack_order():
    mask = torch.zeros(1, 64, 64)
    mask[0, :32, 32:] = 1  # top right quarter
    tokens = token_masks(mask, 2, 2)
    assert tokens.tolist() == [[False, True, False, False]]
    mask[0, 32:40, :] = 1  # a quarter of the bottom tokens: below one half, not covered
    assert token_masks(mask, 2, 2).tolist() == [[False, True, False, False]]


def test_mask_rules_cell_by_cell():
    g, lengths = 2, (3, 1)
    regions = torch.tensor([[True, True, False, False, False],
                            [False, True, True, False, False]])  # image token 1 in both, 3-4 background
    m = joint_mask(g, lengths, regions)
    text = g + sum(lengths)
    assert m.dtype == torch.bool and m.shape == (text + 5, text + 5)
    kinds = ["g"] * g + ["r0"] * 3 + ["r1"] + [f"i{i}" for i in range(5)]

    def expected(q: str, k: str) -> bool:
        if q[0] == "i" and k[0] == "i":
            return True  # image <-> image open
        if q[0] == "r" and k[0] == "r":
            return q == k  # a region's text sees itself only
        if q == "g" and k == "g":
            return True
        if {q[0], k[0]} == {"g", "r"}:
            return False  # global and region texts never meet
        img, txt = (q, k) if q[0] == "i" else (k, q)
        covered = regions[:, int(img[1:])]
        if txt == "g":
            return not covered.any()  # background image tokens <-> the global prompt
        return bool(covered[int(txt[1:])])  # a region's text <-> its image tokens (both ways)

    for qi, q in enumerate(kinds):
        for ki, k in enumerate(kinds):
            assert bool(m[qi, ki]) == expected(q, k), (q, k)
    assert m.any(1).all()  # no empty softmax row


def test_strength_adds_log_bias_where_region_image_sees_its_text():
    regions = torch.tensor([[True, False]])
    m = joint_mask(1, (2,), regions, strengths=(2.0,))
    assert m.dtype == torch.float32
    allowed = joint_mask(1, (2,), regions)
    assert torch.equal(torch.isfinite(m), allowed)
    assert m[3, 1:3].tolist() == pytest.approx([math.log(2.0)] * 2)  # image token 0 -> region text
    assert m[1:3, 3].tolist() == [0.0, 0.0]  # the text's own scores are not biased
    assert m[4, 0].item() == 0.0 and m[3, 0].item() == float("-inf")


def test_region_covering_no_token_is_refused():
    base = TextConditioning(torch.zeros(1, 2, 8), torch.zeros(1, 8))
    mask = torch.zeros(64, 64)
    mask[:4, :4] = 1  # less than half of one 16 px token
    cond = RegionalConditioning.build(base, [(base, mask, 1.0)])
    with pytest.raises(ValueError, match=r"region\(s\) \[1\] cover no 16x16-pixel token"):
        cond.region_tokens(8, 8)


def test_bad_rows_are_refused():
    base = TextConditioning(torch.zeros(1, 2, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="at least one"):
        RegionalConditioning.build(base, [])
    with pytest.raises(ValueError, match="strength 0"):
        RegionalConditioning.build(base, [(base, torch.ones(4, 4), 0.0)])
    with pytest.raises(ValueError, match="region 2's mask is"):
        RegionalConditioning.build(base, [(base, torch.ones(4, 4), 1.0), (base, torch.ones(8, 8), 1.0)])
    with pytest.raises(ValueError, match="T5 width"):
        RegionalConditioning.build(base, [(TextConditioning(torch.zeros(1, 2, 4), torch.zeros(1, 8)),
                                           torch.ones(4, 4), 1.0)])
    with pytest.raises(ValueError, match="do not exist"):
        RegionalSettings(blocks=(0, 5)).block_indices(2, 1)
    with pytest.raises(ValueError, match="exceeds"):
        RegionalSettings(0.6, 0.5)


def test_block_sets():
    assert RegionalSettings(blocks="double").block_indices(2, 3) == {0, 1}
    assert RegionalSettings(blocks="single").block_indices(2, 3) == {2, 3, 4}
    assert RegionalSettings(blocks="odd").block_indices(2, 3) == {1, 3}
    assert RegionalSettings(blocks=(4,)).block_indices(2, 3) == {4}
