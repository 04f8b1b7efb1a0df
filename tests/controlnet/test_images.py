"""Control images and masks of any size are fitted to the output: center crop to its aspect, then resize."""

from __future__ import annotations

import pytest
import torch

from fluxworks.flux_controlnet import fit_image, mask_to_tokens, pixel_cond


def blocky(height: int, width: int, block: int, seed: int = 0) -> torch.Tensor:
    """An IMAGE whose pixels come in constant block x block squares."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(1, height // block, width // block, 3, generator=generator)
    return small.repeat_interleave(block, 1).repeat_interleave(block, 2)


def test_an_image_of_the_output_size_is_used_as_is():
    image = torch.rand(2, 48, 64, 3)
    assert torch.equal(fit_image(image, 48, 64), image)


def test_a_larger_image_is_area_averaged():
    big, small = blocky(96, 128, 2), blocky(96, 128, 2)[:, ::2, ::2]
    torch.testing.assert_close(fit_image(big, 48, 64), small)


def test_a_wider_image_is_center_cropped_before_resizing():
    inner = blocky(96, 128, 2, seed=1)
    wide = torch.cat([torch.zeros(1, 96, 20, 3), inner, torch.ones(1, 96, 20, 3)], dim=2)  # 96 x 168
    torch.testing.assert_close(fit_image(wide, 48, 64), inner[:, ::2, ::2])


def test_a_smaller_image_is_enlarged_bilinearly():
    out = fit_image(torch.rand(1, 24, 32, 3), 48, 64)
    assert out.shape == (1, 48, 64, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_pixel_cond_maps_to_minus_one_one_and_widens_gray():
    gray = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1)
    assert pixel_cond(gray).shape == (1, 3, 1, 3)
    assert pixel_cond(gray)[0, :, 0].tolist() == [[-1.0, 0.0, 1.0]] * 3


def test_mask_tokens_are_patch_means_in_pack_order():
    mask = torch.zeros(1, 32, 64)  # a 4 x 8 latent: 2 x 4 tokens of 16 x 16 px
    mask[:, :16, 16:32] = 1.0  # token (row 0, column 1)
    mask[:, 16:, 48:56] = 1.0  # half of token (row 1, column 3)
    tokens = mask_to_tokens(mask, 4, 8)
    assert tokens.shape == (1, 8, 1)
    assert tokens[0, :, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]


def test_a_bad_mask_shape_is_refused():
    with pytest.raises(ValueError, match="mask must have shape"):
        mask_to_tokens(torch.zeros(1, 1, 8, 8), 4, 4)
