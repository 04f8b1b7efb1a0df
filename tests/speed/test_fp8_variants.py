"""fp8 variants: fast accumulation reaches the GPU GEMM, calibrated (static) activation scales stay close to
bf16, follow each sampling run and switch from calibrating to frozen with one recompile."""

import copy

import pytest
import torch

import fluxworks.flux_speed.fp8_linear as fp8
from devtools.tiny_models import random_flux
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, get_sigmas, sample_flux
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_speed.fp8_linear import (
    CALIBRATION_HEADROOM,
    E4M3_MAX,
    FP8_SCALINGS,
    Fp8Linear,
    calibrated_linears,
    freeze_calibration,
    start_calibration,
)
from fluxworks.flux_speed.prepare import SpeedOptions, prepare
from tests.node_path import sample_node_path
from tests.parity.conftest import rel_err
from tests.speed.test_speed_modes import fp8_cpu_emulation

SHAPE, STEPS = (2, 16, 8, 8), 6
CALIBRATED_TOLERANCE = 0.009  # about 3x the measured 0.0030 (rowwise) and 0.0031 (tensorwise)


def calibrated(scaling: str, bias: bool = True) -> tuple[torch.nn.Linear, Fp8Linear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=bias)
    return linear, Fp8Linear(linear, torch.float32, scaling, activations="calibrated")


@pytest.mark.parametrize("scaling", FP8_SCALINGS)
@torch.no_grad()
def test_calibrated_linear_matches_linear_after_freezing(scaling):
    linear, layer = calibrated(scaling)
    x = torch.randn(3, 7, 256)
    layer(x)
    assert freeze_calibration(layer) == 1 and not layer.calibrating
    assert float(layer.input_scale) == pytest.approx(float(x.abs().amax()) * CALIBRATION_HEADROOM / E4M3_MAX)
    assert rel_err(layer(x), linear(x)) < 0.06
    assert rel_err(layer(0.9 * x), linear(0.9 * x)) < 0.06  # a later step of similar range


@torch.no_grad()
def test_calibrated_scale_clamps_inputs_beyond_its_headroom():
    """Static scales are the price of skipping the per-call amax: an input 10x louder than what calibration
    saw saturates at the frozen range instead of being represented."""
    linear, layer = calibrated("rowwise", bias=False)
    x = torch.randn(8, 256)
    layer(x)
    freeze_calibration(layer)
    assert rel_err(layer(10 * x), linear(10 * x)) > 0.5


def test_freezing_a_linear_that_saw_nothing_is_refused():
    _, layer = calibrated("rowwise")
    with pytest.raises(RuntimeError, match="saw no input"):
        freeze_calibration(layer)


@torch.no_grad()
def test_calibrate_then_freeze_compiles_once_per_state():
    """Inside torch.compile the calibrating/frozen switch is a guard: one graph each, reused on later runs
    (start_calibration and freeze again) instead of a recompile every step."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    _, layer = calibrated("rowwise")
    compiled = torch.compile(layer, backend=counting_backend, fullgraph=True)
    x = torch.randn(4, 32, 256)
    for _ in range(2):
        start_calibration(layer)
        compiled(x)
        compiled(x)
        freeze_calibration(layer)
        frozen = compiled(x)
        compiled(x)
    assert len(graphs) == 2
    assert torch.equal(frozen, layer(x))


@pytest.mark.parametrize("activations", ["dynamic", "calibrated"])
@torch.no_grad()
def test_gpu_path_passes_fast_accum_and_scale_layouts_to_scaled_mm(monkeypatch, activations):
    """What the GPU path hands torch._scaled_mm (checked on the CPU by standing in for it): fast accumulation
    when asked, and a (M, 1) activation scale for the rowwise GEMM even when the scale is static."""
    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None, use_fast_accum=False):
        calls.append({"scale_a": tuple(scale_a.shape), "fast": use_fast_accum})
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    layer = Fp8Linear(linear, torch.float32, "rowwise", fast_accum=True, activations=activations)
    monkeypatch.setattr(fp8, "fp8_matmul_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    x = torch.randn(2, 5, 256)
    layer(x)
    if activations == "calibrated":
        freeze_calibration(layer)
        assert rel_err(layer(x), linear(x)) < 0.06
    assert all(call == {"scale_a": (10, 1), "fast": True} for call in calls) and len(calls) >= 1


@torch.no_grad()
def test_fast_accum_has_no_cpu_effect():
    """Fast accumulation is a GPU GEMM feature: the CPU emulation accumulates in fp32 either way."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    x = torch.randn(3, 256)
    assert torch.equal(Fp8Linear(linear, torch.float32, fast_accum=True)(x), Fp8Linear(linear, torch.float32)(x))


def test_unknown_fp8_activations_are_refused():
    with pytest.raises(ValueError, match="fp8_activations"):
        SpeedOptions(fp8_matmul=True, fp8_activations="static")
    with pytest.raises(ValueError, match="fp8 activations"):
        Fp8Linear(torch.nn.Linear(16, 16), torch.float32, activations="smooth")


@pytest.fixture(scope="module")
def model():
    return random_flux("dev", 0)


def cond(scale: float = 1.0) -> TextConditioning:
    torch.manual_seed(1)
    return TextConditioning(scale * torch.randn(1, 10, 64), torch.randn(1, 64))


def run(prepared, scale: float = 1.0):
    """One sampling run on an already prepared transformer, as `sample_prepared` runs it."""
    with prepared.run():
        x, _ = sample_flux(prepared.model, True, cond(scale), None, torch.zeros(SHAPE), make_noise(SHAPE, 4),
                           get_sigmas(STEPS, 0.9), GuidanceCurve.constant(3.5), scope=prepared.evaluation)
    return x


def eager(model):
    x, _ = sample_flux(model, True, cond(), None, torch.zeros(SHAPE), make_noise(SHAPE, 4), get_sigmas(STEPS, 0.9),
                       GuidanceCurve.constant(3.5))
    return x


@pytest.mark.parametrize("scaling", FP8_SCALINGS)
def test_calibrated_transformer_stays_close_to_eager(model, scaling):
    options = SpeedOptions(fp8_matmul=True, fp8_scaling=scaling, fp8_activations="calibrated")
    with fp8_cpu_emulation():
        x, _, prepared = sample_node_path(model, True, cond(), None, torch.zeros(SHAPE), make_noise(SHAPE, 4),
                                          get_sigmas(STEPS, 0.9), GuidanceCurve.constant(3.5), options=options,
                                          return_prepared=True)
    assert prepared.calibrated
    assert rel_err(x, eager(model)) < CALIBRATED_TOLERANCE
    assert not any(m.calibrating for m in calibrated_linears(prepared.model))  # frozen after the first step


@torch.no_grad()
def test_each_sampling_run_recalibrates(model):
    """A new prompt gets its own scales: each run forgets the previous run's, and the frozen scales follow the new
    run's activations."""
    options = SpeedOptions(fp8_matmul=True, fp8_activations="calibrated")
    with fp8_cpu_emulation():
        prepared = prepare(model, options, torch.device("cpu"), torch.float32)
    run(prepared)
    first = [float(m.input_scale) for m in calibrated_linears(prepared.model)]
    run(prepared, scale=8.0)  # a much louder prompt
    louder = [float(m.input_scale) for m in calibrated_linears(prepared.model)]
    assert louder != first
    run(prepared)
    assert [float(m.input_scale) for m in calibrated_linears(prepared.model)] == first
    assert not prepare(model, SpeedOptions(), torch.device("cpu"), torch.float32).calibrated
    with pytest.raises(ValueError, match="offload"):
        SpeedOptions(fp8_matmul=True, fp8_activations="calibrated", offload_resident_blocks=1)


def test_kernel_tuning_is_scoped_to_the_compiled_blocks(model):
    import torch._inductor.config as inductor_config

    from fluxworks.flux_speed.compile import compile_blocks

    before = (inductor_config.coordinate_descent_tuning, inductor_config.max_autotune_pointwise)
    compile_blocks(copy.deepcopy(model), tune_kernels=True)  # torch.compile checks the option names here
    assert (inductor_config.coordinate_descent_tuning, inductor_config.max_autotune_pointwise) == before
    with pytest.raises(ValueError, match="mode"):
        compile_blocks(copy.deepcopy(model), mode="max-autotune", tune_kernels=True)
