import math

import pytest
import torch

from fluxworks.flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len, shift_to_mu, time_shift


def test_unshifted_schedule_is_linear_from_one_to_zero():
    sigmas = get_sigmas(4)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_mu_matches_bfl_endpoints():
    assert calculate_mu(256) == pytest.approx(0.5)
    assert calculate_mu(4096) == pytest.approx(1.15)
    assert image_seq_len(128, 128) == 4096  # 1024x1024 image


def test_shifted_schedule_keeps_endpoints_and_moves_middle_up():
    mu = calculate_mu(4096)
    sigmas = get_sigmas(28, mu)
    assert len(sigmas) == 29 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool(torch.all(sigmas[1:-1] > torch.linspace(1, 0, 29)[1:-1]))
    assert bool(torch.all(sigmas[:-1] > sigmas[1:]))
    assert float(sigmas[14]) == pytest.approx(float(time_shift(mu, 1.0, torch.tensor(0.5))), rel=1e-6)


def test_constant_shift_equals_sd3_formula():
    s = 3.0
    t = torch.tensor(0.3, dtype=torch.float64)
    assert float(time_shift(shift_to_mu(s), 1.0, t)) == pytest.approx(s * 0.3 / (1 + (s - 1) * 0.3))


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    full = get_sigmas(8, 1.0)
    half = get_sigmas(4, 1.0, denoise=0.5)
    assert torch.allclose(half, full[-5:])


@pytest.mark.parametrize("steps,denoise", [(0, 1.0), (-3, 1.0), (4, 0.0), (4, 1.5)])
def test_invalid_arguments_are_rejected(steps, denoise):
    with pytest.raises(ValueError):
        get_sigmas(steps, None, denoise)


def test_mu_of_dev_at_1024_is_its_published_value():
    assert math.exp(calculate_mu(4096)) == pytest.approx(3.158, rel=1e-3)
