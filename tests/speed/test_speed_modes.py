"""Each speed mode, run through the FluxWorks Sampler's own path (`sample_prepared` with the mode's options),
computes the same function as eager diffusers on tiny weights, within a tolerance at most ~3x its measured error
(the measured value is written next to each bound)."""

import contextlib
import copy
from unittest import mock

import pytest
import torch

from devtools.tiny_models import random_flux
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, get_sigmas, sample_flux
from fluxworks.flux_sampler.latents import make_noise
from fluxworks.flux_speed.fp8_linear import FP8_SCALINGS, Fp8Linear, quantize_tensor
from fluxworks.flux_speed.prepare import SpeedOptions
from fluxworks.flux_speed.step_cache import StepCacheConfig
from tests.node_path import sample_node_path
from tests.parity.conftest import rel_err

SHAPE, STEPS = (2, 16, 8, 8), 8
# Tolerances: about 3x the error measured on this tiny model (measured value in the comment).
CACHE_TOLERANCE = 0.015  # measured 0.0055 (3 of 8 steps reused)
FP8_TOLERANCE = {"rowwise": 0.009, "tensorwise": 0.009}  # measured 0.0030 and 0.0030
COMPILE_TOLERANCE = 3e-7  # measured 8.6e-8
CACHE_REUSE_TOLERANCE = 1e-5  # reused vs full call, same inputs + ControlNet residuals; measured 1.4e-7


@contextlib.contextmanager
def fp8_cpu_emulation():
    """Let `prepare` quantise on the CPU, where Fp8Linear emulates the GPU's fp8 arithmetic in float32."""
    with mock.patch("fluxworks.flux_speed.prepare.fp8_matmul_supported", return_value=True):
        yield


@pytest.fixture(scope="module")
def model():
    return random_flux("dev", 0)


@pytest.fixture(scope="module")
def cond():
    torch.manual_seed(1)
    return TextConditioning(torch.randn(1, 10, 64), torch.randn(1, 64))


def sample(model, cond, negative=None, curve=None, options: SpeedOptions | None = None, prepared: bool = False):
    """The node path with `options`; with `prepared`, also the PreparedTransformer (cache counts)."""
    x, _, run = sample_node_path(model, True, cond, negative, torch.zeros(SHAPE), make_noise(SHAPE, 4),
                                 get_sigmas(STEPS, 0.9), curve or GuidanceCurve.constant(3.5), options=options,
                                 return_prepared=True)
    return (x, run) if prepared else x


def eager(model, cond, negative=None, curve=None):
    """Plain diffusers forward, no preparation at all: the reference."""
    x, _ = sample_flux(model, True, cond, negative, torch.zeros(SHAPE), make_noise(SHAPE, 4), get_sigmas(STEPS, 0.9),
                       curve or GuidanceCurve.constant(3.5))
    return x


def test_node_defaults_equal_the_diffusers_forward(model, cond):
    assert torch.equal(sample(model, cond), eager(model, cond))


def test_cache_with_threshold_zero_is_exact(model, cond):
    x, run = sample(model, cond, options=SpeedOptions(cache=StepCacheConfig(threshold=0.0)), prepared=True)
    assert torch.equal(x, eager(model, cond))
    assert run.cache.hits == 0 and run.cache.misses == STEPS


def test_cache_skips_steps_inside_its_window_and_stays_close(model, cond):
    config = StepCacheConfig(threshold=0.5, start_percent=0.2, end_percent=0.8, max_consecutive=2)
    cached, run = sample(model, cond, options=SpeedOptions(cache=config), prepared=True)
    assert run.cache.hits > 0 and run.cache.hits + run.cache.misses == STEPS
    assert all(0.2 <= i / (STEPS - 1) <= 0.8 for i in run.cache.reused_steps)  # only inside the window
    assert rel_err(cached, eager(model, cond)) < CACHE_TOLERANCE


def test_cache_keeps_positive_and_negative_streams_apart(model, cond):
    torch.manual_seed(2)
    negative = TextConditioning(torch.randn(1, 10, 64), torch.randn(1, 64))
    curve = GuidanceCurve(cfg_scale=2.0)
    x, run = sample(model, cond, negative, curve, SpeedOptions(cache=StepCacheConfig(threshold=0.0)), prepared=True)
    assert torch.equal(x, eager(model, cond, negative, curve))
    assert set(run.cache.streams) == {"positive", "negative"}


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
    """fp8 matmul through the node path (the CPU emulates the GPU's quantised arithmetic: `fp8_cpu_emulation`)."""
    options = SpeedOptions(fp8_matmul=True, fp8_scaling=scaling)
    with fp8_cpu_emulation():
        fast = sample(model, cond, options=options)
    assert rel_err(fast, eager(model, cond)) < FP8_TOLERANCE[scaling]


def test_block_offload_computes_the_same(model, cond):
    assert torch.equal(sample(model, cond, options=SpeedOptions(offload_resident_blocks=1)), eager(model, cond))


def test_compiled_blocks_compute_the_same(model, cond):
    """compile_blocks' CPU path (prepare skips compile on the CPU, so this compiles a copy directly)."""
    from fluxworks.flux_speed.compile import compile_blocks

    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    assert rel_err(sample(compiled, cond), eager(model, cond)) < COMPILE_TOLERANCE


def test_prepared_transformer_leaves_the_loaded_model_untouched(model, cond):
    from fluxworks.flux_speed.prepare import prepare

    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = SpeedOptions(fp8_matmul=True, attention="math", cache=StepCacheConfig(0.0))
    prepared = prepare(model, options, torch.device("cpu"), torch.float32, interrupt=lambda: None)
    assert prepared.model is not model
    assert torch.equal(sample(model, cond, options=options), eager(model, cond))  # no fp8 on the CPU: exact
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    original = [getattr(m.processor, "_attention_backend", None) for m in model.modules() if hasattr(m, "processor")]
    cloned = [getattr(m.processor, "_attention_backend", None) for m in prepared.model.modules()
              if hasattr(m, "processor")]
    assert set(original) == {None} and set(cloned) == {"_native_math"}
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())  # hooks live on the clone only


def controlnet_call_full_then_reused(model, cond):
    """Two calls of a cached prepared transformer on identical inputs with ControlNet residuals, as steps 0 and 1 of
    4 (the second reuses the cache); returns (full output, reused output, prepared)."""
    from fluxworks.flux_sampler.progress import StepPosition
    from fluxworks.flux_speed.prepare import prepare

    config = StepCacheConfig(threshold=0.5, start_percent=0.0, end_percent=1.0, max_consecutive=5)
    prepared = prepare(model, SpeedOptions(cache=config), torch.device("cpu"), torch.float32)
    torch.manual_seed(5)
    tokens, dim = 16, model.config.num_attention_heads * model.config.attention_head_dim
    inputs = dict(hidden_states=torch.randn(1, tokens, model.config.in_channels),
                  encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), txt_ids=torch.zeros(cond.embeds.shape[1], 3),
                  img_ids=torch.zeros(tokens, 3),
                  controlnet_block_samples=[torch.randn(1, tokens, dim) for _ in model.transformer_blocks],
                  controlnet_single_block_samples=[torch.randn(1, tokens, dim)
                                                   for _ in model.single_transformer_blocks])
    with torch.no_grad(), prepared.run():
        outs = []
        for step in range(2):
            with prepared.evaluation(StepPosition(step, 4), "positive"):
                outs.append(prepared.model(**inputs, return_dict=False)[0])
    return outs[0], outs[1], prepared


def test_cache_reuse_adds_the_current_controlnet_residuals_once(model, cond):
    """A reused step keeps the blocks' own residual and lets diffusers' forward add this step's ControlNet
    residuals: with identical inputs and controls the reused call equals the full one (adding the residuals twice,
    as a cache of the whole residual would, is off by their sum)."""
    full, reused, prepared = controlnet_call_full_then_reused(model, cond)
    assert prepared.cache.hits == 1 and prepared.cache.reused_steps == [1]
    assert rel_err(reused, full) < CACHE_REUSE_TOLERANCE


def test_an_interrupt_is_honoured_inside_a_step(model, cond):
    """The node passes ComfyUI's cancel check; it runs before every block, so a cancel stops a long step."""
    from fluxworks.flux_speed.prepare import sample_prepared

    class Cancelled(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_prepared(model, SpeedOptions(), torch.device("cpu"), torch.float32, interrupt=interrupt,
                        guidance_embeds=True, positive=cond, negative=None, latent=torch.zeros(SHAPE),
                        noise=make_noise(SHAPE, 4), sigmas=get_sigmas(STEPS, 0.9), curve=GuidanceCurve.constant(3.5))
    assert len(calls) == 2  # the second block of the first step, not the end of the step


def test_a_loaded_model_with_a_diffusers_hook_registry_stays_clean(model, cond):
    """Running diffusers' own pipeline on the loaded model gives it a hook registry; prepared clones must not share
    it (their hooks would land on the loaded model and later clones would run the loaded model's forward)."""
    from diffusers.hooks import HookRegistry

    from fluxworks.flux_speed.prepare import prepare

    bare = copy.deepcopy(model)
    HookRegistry.check_if_exists_or_initialize(bare)
    options = SpeedOptions(cache=StepCacheConfig(threshold=0.0))
    first = prepare(bare, options, torch.device("cpu"), torch.float32)
    assert bare._diffusers_hook.hooks == {}
    assert first.model._diffusers_hook is not bare._diffusers_hook
    assert torch.equal(sample(bare, cond, options=options), eager(model, cond))


def test_a_prepared_slot_reuses_the_prepared_transformer_only_while_nothing_changed(model, cond):
    """The next prompt reuses the prepared transformer (fp8 copies, hooks, compiled blocks) while options, device
    and weights are the same; a weight change (a LoRA merge patches in place) or other options prepare anew, and a
    kept one gives the same result as a fresh one."""
    from fluxworks.flux_speed.prepare import PreparedSlot, sample_prepared

    weights = copy.deepcopy(model)
    slot = PreparedSlot()
    options = SpeedOptions(cache=StepCacheConfig(threshold=0.5, start_percent=0.2, end_percent=0.8))

    def run(opts=options):
        x, _, prepared = sample_prepared(weights, opts, torch.device("cpu"), torch.float32, slot=slot,
                                         guidance_embeds=True, positive=cond, negative=None,
                                         latent=torch.zeros(SHAPE), noise=make_noise(SHAPE, 4),
                                         sigmas=get_sigmas(STEPS, 0.9), curve=GuidanceCurve.constant(3.5))
        return x, prepared

    first, a = run()
    again, b = run()
    assert b is a and torch.equal(again, first)  # kept, and its cache state starts fresh each run
    with torch.no_grad():
        weights.transformer_blocks[0].attn.to_q.weight.add_(0.01)  # what an in-place LoRA merge does
    changed, c = run()
    assert c is not a and not torch.equal(changed, first)
    with torch.no_grad():
        weights.transformer_blocks[0].attn.to_q.weight.sub_(0.01)
    _, d = run(SpeedOptions())
    assert d is not c
    slot.release()
    assert slot.prepared is None
    _, e = run(SpeedOptions(offload_resident_blocks=1))
    assert slot.prepared is None and e.offloader is not None  # streaming state is never kept

