"""Each speed mode computes the same function as eager on tiny weights, within its stated tolerance."""

import copy

import pytest
import torch

from devtools.tiny_models import random_flux
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, get_sigmas, sample_flux
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_speed.fp8_linear import FP8_SCALINGS, Fp8Linear, quantize_tensor, quantize_transformer_linears
from fluxworks.flux_speed.offload import BlockOffloader
from fluxworks.flux_speed.runner import FluxRunner
from fluxworks.flux_speed.step_cache import StepCacheConfig
from tests.parity.conftest import rel_err

SHAPE, STEPS = (2, 16, 8, 8), 8


@pytest.fixture(scope="module")
def model():
    return random_flux("dev", 0)


@pytest.fixture(scope="module")
def cond():
    torch.manual_seed(1)
    return TextConditioning(torch.randn(1, 10, 64), torch.randn(1, 64))


def sample(model_or_runner, cond, negative=None, curve=None):
    sigmas = get_sigmas(STEPS, 0.9)
    if isinstance(model_or_runner, FluxRunner):
        model_or_runner.begin(sigmas)
    x, den = sample_flux(model_or_runner, True, cond, negative, torch.zeros(SHAPE), make_noise(SHAPE, 4), sigmas,
                         curve or GuidanceCurve.constant(3.5))
    return x


def test_runner_without_cache_equals_the_diffusers_forward(model, cond):
    assert torch.equal(sample(FluxRunner(model), cond), sample(model, cond))


def test_cache_with_threshold_zero_is_exact(model, cond):
    runner = FluxRunner(model, StepCacheConfig(threshold=0.0))
    assert torch.equal(sample(runner, cond), sample(model, cond))
    assert runner.cache_state.hits == 0 and runner.cache_state.misses == STEPS


def test_cache_skips_steps_inside_its_window_and_stays_close(model, cond):
    runner = FluxRunner(model, StepCacheConfig(threshold=0.5, start_percent=0.2, end_percent=0.8, max_consecutive=2))
    cached = sample(runner, cond)
    state = runner.cache_state
    assert state.hits > 0 and state.hits + state.misses == STEPS
    assert state.hits <= 4  # only steps with progress in [0.2, 0.8] may reuse
    assert rel_err(cached, sample(model, cond)) < 0.1


def test_cache_keeps_positive_and_negative_streams_apart(model, cond):
    torch.manual_seed(2)
    negative = TextConditioning(torch.randn(1, 10, 64), torch.randn(1, 64))
    curve = GuidanceCurve(cfg_scale=2.0)
    runner = FluxRunner(model, StepCacheConfig(threshold=0.0))
    assert torch.equal(sample(runner, cond, negative, curve), sample(model, cond, negative, curve))
    assert len(runner.cache_state.streams) == 2


@pytest.mark.parametrize("scaling", FP8_SCALINGS)
def test_fp8_linear_matches_linear_within_fp8_precision(scaling):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        assert rel_err(Fp8Linear(linear, torch.float32, scaling)(x), linear(x)) < 0.06


def test_tensorwise_scaling_trades_accuracy_on_uneven_tokens():
    """One token 10^5 times louder sets the whole activation's scale, pushing the quiet tokens into fp8's
    subnormal range where they lose precision: the cost of the faster tensorwise GEMM, which per-token
    (rowwise) scaling avoids. Within ~100x of each other, tokens keep full fp8 precision either way."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=False)
    x = torch.randn(16, 256)
    x[0] *= 1e5
    with torch.no_grad():
        quiet = linear(x)[1:]
        errors = {s: rel_err(Fp8Linear(linear, torch.float32, s)(x)[1:], quiet) for s in FP8_SCALINGS}
    assert errors["rowwise"] < 0.06 < errors["tensorwise"]


def test_tensorwise_emulation_equals_torch_scaled_mm():
    """On the CPU, Fp8Linear computes what torch._scaled_mm's tensorwise path computes (bias in the epilogue,
    bf16 output), called exactly as the GPU path calls it."""
    torch.manual_seed(0)
    layer = Fp8Linear(torch.nn.Linear(256, 384), torch.bfloat16, "tensorwise")
    assert layer.weight_scale.numel() == 1 and layer.weight_scale.dtype == torch.float32
    x = torch.randn(4, 8, 256, dtype=torch.bfloat16)
    xq, xs = quantize_tensor(x.reshape(-1, 256))
    try:
        expected = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=layer.weight_scale, bias=layer.bias,
                                    out_dtype=torch.bfloat16)
    except (NotImplementedError, RuntimeError) as e:
        pytest.skip(f"this torch build has no CPU _scaled_mm: {e}")
    with torch.no_grad():
        assert rel_err(layer(x).reshape(-1, 384).float(), expected.float()) < 1e-2


def test_unknown_fp8_scaling_is_refused():
    from fluxworks.flux_speed.prepare import SpeedOptions

    with pytest.raises(ValueError, match="fp8_scaling"):
        SpeedOptions(fp8_matmul=True, fp8_scaling="blockwise")
    with pytest.raises(ValueError, match="fp8 scaling"):
        Fp8Linear(torch.nn.Linear(16, 16), torch.float32, "columnwise")


@pytest.mark.parametrize("scaling", FP8_SCALINGS)
def test_fp8_transformer_stays_close_to_eager(model, cond, scaling):
    fast = copy.deepcopy(model)
    assert quantize_transformer_linears(fast, torch.float32, scaling=scaling) > 0
    assert rel_err(sample(fast, cond), sample(model, cond)) < 0.1


def test_block_offload_computes_the_same(model, cond):
    offloaded = copy.deepcopy(model)
    blocks = list(offloaded.transformer_blocks) + list(offloaded.single_transformer_blocks)
    runner = FluxRunner(offloaded, offloader=BlockOffloader(blocks, torch.device("cpu"), resident=1))
    assert torch.equal(sample(runner, cond), sample(model, cond))


def test_compiled_blocks_compute_the_same(model, cond):
    from fluxworks.flux_speed.compile import compile_blocks

    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    assert rel_err(sample(FluxRunner(compiled), cond), sample(model, cond)) < 1e-5


def test_prepared_runner_leaves_the_loaded_model_untouched(model, cond):
    from fluxworks.flux_speed.prepare import SpeedOptions, prepare_runner

    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = prepare_runner(model, SpeedOptions(fp8_matmul=True, attention="math", cache=StepCacheConfig(0.0)),
                            torch.device("cpu"), torch.float32)
    assert runner.transformer is not model
    assert torch.equal(sample(runner, cond), sample(model, cond))  # fp8 needs a GPU: exact fallback here
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    original = [getattr(m.processor, "_attention_backend", None) for m in model.modules() if hasattr(m, "processor")]
    cloned = [getattr(m.processor, "_attention_backend", None) for m in runner.transformer.modules()
              if hasattr(m, "processor")]
    assert set(original) == {None} and set(cloned) == {"_native_math"}
