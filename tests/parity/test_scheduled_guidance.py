"""Scheduled guidance and windowed true CFG in the sampling loop, against a hand-written diffusers loop."""

import pytest
import torch

from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, get_sigmas
from fluxworks.flux_sampler.latents import make_noise
from tests.node_path import sample_node_path
from tests.parity.conftest import flux_scheduler, rel_err

SHAPE, STEPS = (1, 16, 8, 8), 6


class Recorder:
    """Records the guidance and text length of every forward call of a transformer (a forward pre-hook, which the
    sampler's prepared clone keeps), as a context manager that removes the hook on exit."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls: list[tuple[float, int]] = []

    def _record(self, module, args, kwargs):
        self.calls.append((float(kwargs["guidance"][0]), kwargs["encoder_hidden_states"].shape[1]))

    def __enter__(self):
        self.handle = self.transformer.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def conds():
    torch.manual_seed(3)
    return TextConditioning(torch.randn(1, 12, 64), torch.randn(1, 64)), \
        TextConditioning(torch.randn(1, 7, 64), torch.randn(1, 64))


def run(model, curve, positive, negative=None):
    return sample_node_path(model, True, positive, negative, torch.zeros(SHAPE), make_noise(SHAPE, 9),
                       get_sigmas(STEPS, 0.8), curve)


def test_per_step_guidance_equals_the_curve(transformers_by_variant, conds):
    model = transformers_by_variant["dev"]
    curve = GuidanceCurve(6.0, 1.5, "cosine", start_percent=0.2, end_percent=0.8)
    with Recorder(model) as recorder:
        _, denoiser = run(model, curve, conds[0])
    assert [g for g, _ in recorder.calls] == pytest.approx(curve.values(STEPS), abs=1e-6)
    assert denoiser.guidance_history == curve.values(STEPS)


def test_constant_curve_reproduces_the_plain_sampler_bit_for_bit(transformers_by_variant, conds):
    model = transformers_by_variant["dev"]
    plain, _ = run(model, GuidanceCurve.constant(3.5), conds[0])
    flat = GuidanceCurve(3.5, 3.5, "linear", start_percent=0.1, end_percent=0.9)
    scheduled, _ = run(model, flat, conds[0])
    assert torch.equal(plain, scheduled)


def test_scheduled_guidance_equals_a_manual_diffusers_loop(transformers_by_variant, conds):
    """Reference: diffusers' scheduler stepping the transformer with the curve's value at each step."""
    from fluxworks.flux_sampler.latents import make_img_ids, pack, unpack

    model = transformers_by_variant["dev"]
    curve = GuidanceCurve(5.0, 2.0, "linear")
    scheduler = flux_scheduler("dev")
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).numpy(), mu=0.8)
    latents = pack(make_noise(SHAPE, 9))
    pos = conds[0]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v = model(hidden_states=latents, encoder_hidden_states=pos.embeds, pooled_projections=pos.pooled,
                      timestep=(t / 1000).expand(1), guidance=torch.full((1,), curve.value_at(i / (STEPS - 1))),
                      txt_ids=torch.zeros(12, 3), img_ids=make_img_ids(8, 8, torch.device("cpu"), torch.float32),
                      return_dict=False)[0]
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
    ours, _ = run(model, curve, pos)
    assert rel_err(ours, unpack(latents, 8, 8)) <= 1e-6


def test_true_cfg_evaluates_the_negative_only_inside_its_window(transformers_by_variant, conds):
    model = transformers_by_variant["dev"]
    curve = GuidanceCurve.constant(3.5)
    windowed = GuidanceCurve(3.5, 3.5, "constant", cfg_scale=4.0, cfg_start_percent=0.2, cfg_end_percent=0.6)
    with Recorder(model) as recorder:
        _, denoiser = run(model, windowed, *conds)
    inside = [windowed.cfg_active(i / (STEPS - 1)) for i in range(STEPS)]
    assert inside == [False, True, True, True, False, False]  # progress 0, .2, .4, .6, .8, 1
    assert denoiser.forward_calls == STEPS + sum(inside)
    negative_calls = [length for _, length in recorder.calls if length == 7]
    assert len(negative_calls) == sum(inside)
    _, plain = run(model, curve, *conds)  # cfg_scale 1: the negative is never evaluated
    assert plain.forward_calls == STEPS


def test_true_cfg_combines_velocities_like_diffusers(transformers_by_variant, conds):
    """Within its window true CFG is v_neg + s * (v_pos - v_neg), as FluxPipeline's true_cfg_scale."""
    model = transformers_by_variant["dev"]
    scale = 2.5
    full_window = GuidanceCurve(3.5, 3.5, "constant", cfg_scale=scale)
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=flux_scheduler("dev"), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    pos = conds[0]
    neg = TextConditioning(torch.randn(1, 12, 64), torch.randn(1, 64))  # FluxPipeline needs equal lengths
    from fluxworks.flux_sampler.latents import pack, unpack

    ref = pipe(prompt_embeds=pos.embeds, pooled_prompt_embeds=pos.pooled, negative_prompt_embeds=neg.embeds,
               negative_pooled_prompt_embeds=neg.pooled, true_cfg_scale=scale, height=64, width=64,
               num_inference_steps=STEPS, guidance_scale=3.5, sigmas=None, output_type="latent",
               latents=pack(make_noise(SHAPE, 9)), max_sequence_length=512).images
    # FluxPipeline derives mu from the image size (64x64 -> 16 tokens); use the same shift here.
    from fluxworks.flux_sampler import calculate_mu

    ours, _ = sample_node_path(model, True, pos, neg, torch.zeros(SHAPE), make_noise(SHAPE, 9),
                          get_sigmas(STEPS, calculate_mu(16)), full_window)
    assert rel_err(ours, unpack(ref, 8, 8)) <= 1e-6
