import math

import pytest
import torch

from fluxworks.flux_sampler.guidance import GuidanceCurve, progress_from_sigma, step_progress
from fluxworks.flux_sampler.schedule import get_sigmas


def test_constant_curve_is_flat():
    assert GuidanceCurve.constant(3.5).values(7) == [3.5] * 7


def test_linear_curve_hits_start_and_end_on_first_and_last_step():
    values = GuidanceCurve(5.0, 1.0, "linear").values(5)
    assert values == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0])


def test_cosine_curve_eases_in_and_out():
    curve = GuidanceCurve(4.0, 2.0, "cosine")
    assert curve.value_at(0.5) == pytest.approx(3.0)
    assert curve.value_at(0.1) == pytest.approx(4.0 - 2.0 * (1 - math.cos(math.pi * 0.1)) / 2)
    assert curve.value_at(0.1) > 4.0 - 2.0 * 0.1  # slower than linear at the start


def test_exponential_curve_is_geometric():
    curve = GuidanceCurve(8.0, 2.0, "exponential")
    assert curve.value_at(0.5) == pytest.approx(4.0)


def test_window_holds_values_outside_and_step_jumps_at_its_middle():
    curve = GuidanceCurve(6.0, 2.0, "step", start_percent=0.2, end_percent=0.6)
    assert curve.value_at(0.0) == 6.0
    assert curve.value_at(0.39) == 6.0
    assert curve.value_at(0.41) == 2.0
    assert curve.value_at(1.0) == 2.0
    linear = GuidanceCurve(6.0, 2.0, "linear", start_percent=0.2, end_percent=0.6)
    assert linear.value_at(0.1) == 6.0 and linear.value_at(0.4) == pytest.approx(4.0) and linear.value_at(0.9) == 2.0


def test_cfg_window_is_inclusive_and_off_at_scale_one():
    curve = GuidanceCurve(cfg_scale=3.0, cfg_start_percent=0.25, cfg_end_percent=0.5)
    active = [curve.cfg_active(step_progress(i, 5)) for i in range(5)]
    assert active == [False, True, True, False, False]
    assert not GuidanceCurve(cfg_scale=1.0).cfg_active(0.3)


@pytest.mark.parametrize("kwargs", [
    {"shape": "wiggly"},
    {"start_percent": 0.8, "end_percent": 0.2},
    {"cfg_start_percent": 0.9, "cfg_end_percent": 0.1},
    {"start_percent": -0.1},
    {"shape": "exponential", "start_value": 0.0},
    {"cfg_scale": -1.0},
])
def test_invalid_curves_raise_with_the_field_name(kwargs):
    with pytest.raises(ValueError) as err:
        GuidanceCurve(**kwargs)
    assert any(word in str(err.value) for word in ("shape", "percent", "positive", "cfg_scale"))


def test_progress_from_sigma_recovers_the_step_of_a_host_schedule():
    sigmas = get_sigmas(6, 1.1)
    for i in range(6):
        assert progress_from_sigma(sigmas, sigmas[i:i + 1]) == pytest.approx(step_progress(i, 6))
    assert progress_from_sigma(sigmas, torch.tensor([float(sigmas[2]) * 1000 / 1000])) == pytest.approx(0.4)


@pytest.mark.parametrize("field", ["start_value", "end_value", "cfg_scale", "start_percent", "cfg_end_percent"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_field(field, bad):
    with pytest.raises(ValueError, match=field):
        GuidanceCurve(**{field: bad})
