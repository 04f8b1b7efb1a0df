"""The interrupt checks inside long blocks (flux_speed.interrupt): a block run in pieces (batch pieces, or token
pieces with query-chunked attention) computes what diffusers' whole-block forward computes, within float32
rounding, with step cache, block offload, ControlNet residuals and an attention mask; and the cancel check runs
between the pieces, so it stops a block midway."""

import pytest
import torch

from devtools.tiny_models import random_flux
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, get_sigmas, sample_flux
from fluxworks.flux_sampler.latents import make_img_ids, make_noise
from fluxworks.flux_speed.interrupt import InterruptCheck, attach_interrupt_checks, token_work, work_per_check
from fluxworks.flux_speed.prepare import SpeedOptions, clone_structure, sample_prepared
from fluxworks.flux_speed.step_cache import StepCacheConfig
from tests.parity.conftest import rel_err

CPU = torch.device("cpu")
WIDTH = 256  # the tiny model's 2 heads x 128
TEXT = 8
# Pieces of fewer than 256 rows round differently in float32 GEMM/SDPA: measured up to 1.8e-7 relative here.
PIECES_TOLERANCE = 5e-7
# Work levels (multiply-adds between checks) for a (3, 16x16-latent) input: 72 tokens per sample.
PER_SAMPLE = 72 * token_work(WIDTH) + 2 * 72 * 72 * WIDTH
WORK = {
    "whole": 10**12,  # one piece: the block's own forward
    "batch pieces": 2 * PER_SAMPLE,  # two samples at a time through the block's own forward
    "token pieces": PER_SAMPLE // 3,  # each sample's tokens in pieces of 24
    "tiny pieces": 10**5,  # one token / one query at a time (on a (1, 8x8-latent) input: 24 tokens)
}


@pytest.fixture(scope="module")
def model():
    return random_flux("dev", 0)


def transformer_inputs(batch: int, latent: int, controls: bool = False, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    tokens = (latent // 2) ** 2
    inputs = dict(hidden_states=torch.randn(batch, tokens, 64), encoder_hidden_states=torch.randn(batch, TEXT, 64),
                  pooled_projections=torch.randn(batch, 64), timestep=torch.rand(batch),
                  guidance=torch.full((batch,), 3.5), txt_ids=torch.zeros(TEXT, 3),
                  img_ids=make_img_ids(latent, latent, CPU, torch.float32))
    if controls:
        inputs["controlnet_block_samples"] = [torch.randn(batch, tokens, WIDTH)]
        inputs["controlnet_single_block_samples"] = [torch.randn(batch, tokens, WIDTH) for _ in range(2)]
    return inputs


def in_pieces(model, work: int, check=None):
    clone = clone_structure(model)
    attach_interrupt_checks(clone, InterruptCheck(check or (lambda: None), work), CPU)
    return clone


@pytest.mark.parametrize("level", list(WORK))
def test_blocks_in_pieces_compute_the_whole_blocks(model, level):
    inputs = transformer_inputs(1, 8, controls=True) if level == "tiny pieces" else transformer_inputs(3, 16, True)
    calls = []
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        out = in_pieces(model, WORK[level], lambda: calls.append(1))(**inputs, return_dict=False)[0]
    if level == "whole":
        assert torch.equal(out, reference) and len(calls) == 3  # one check per block
    else:
        assert rel_err(out, reference) < PIECES_TOLERANCE
        assert len(calls) > 3


def test_an_attention_mask_is_cut_with_its_queries(model):
    """A regional prompt's (1, 1, L, L) mask reaches each query piece's rows (boolean, every row keeps itself)."""
    inputs = transformer_inputs(2, 16)
    length = TEXT + 64
    torch.manual_seed(9)
    mask = (torch.rand(length, length) < 0.5) | torch.eye(length, dtype=torch.bool)
    inputs["joint_attention_kwargs"] = {"attention_mask": mask[None, None]}
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        unmasked = model(**{**inputs, "joint_attention_kwargs": None}, return_dict=False)[0]
        out = in_pieces(model, WORK["token pieces"])(**inputs, return_dict=False)[0]
    assert rel_err(out, reference) < PIECES_TOLERANCE
    assert rel_err(unmasked, reference) > 1e-2  # the mask matters


SHAPE, STEPS = (2, 16, 8, 8), 4
SAMPLING_WORK = 8 * token_work(WIDTH)  # 24 tokens per sample, in pieces of 8


@pytest.mark.parametrize("options", [SpeedOptions(), SpeedOptions(cache=StepCacheConfig(1.0, 0.0, 1.0)),
                                     SpeedOptions(offload_resident_blocks=1)], ids=["plain", "step cache", "offload"])
def test_sampling_with_pieces_matches_diffusers(model, options):
    """The sampler's path (`sample_prepared`) with token pieces against plain diffusers sampling; with the step
    cache, against the same cache on whole blocks (its reuse decisions must not change)."""
    torch.manual_seed(1)
    cond = TextConditioning(torch.randn(1, TEXT, 64), torch.randn(1, 64))
    args = dict(guidance_embeds=True, positive=cond, negative=None, latent=torch.zeros(SHAPE),
                noise=make_noise(SHAPE, 4), sigmas=get_sigmas(STEPS, 0.9), curve=GuidanceCurve.constant(3.5))
    x, _, prepared = sample_prepared(model, options, CPU, torch.float32,
                                     interrupt=InterruptCheck(lambda: None, SAMPLING_WORK), **args)
    if options.cache is None:
        reference, _ = sample_flux(model, **args)
    else:
        reference, _, whole = sample_prepared(model, options, CPU, torch.float32, interrupt=lambda: None, **args)
        assert prepared.cache.reused_steps == whole.cache.reused_steps and prepared.cache.hits > 0
    assert rel_err(x, reference) < PIECES_TOLERANCE


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("level", ["batch pieces", "token pieces"])
def test_a_cancel_stops_a_block_midway(model, level):
    """The check runs between pieces: a cancel on the 2nd check raises inside the first block."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    entered = []
    clone = in_pieces(model, WORK[level], check)
    clone.transformer_blocks[0].register_forward_pre_hook(lambda *a: entered.append(1))
    with torch.no_grad(), pytest.raises(Cancelled):
        clone(**transformer_inputs(3, 16), return_dict=False)
    assert len(calls) == 2 and len(entered) == 1


def test_pieces_only_on_the_cpu():
    assert work_per_check(CPU) is not None
    assert work_per_check(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="at least 1"):
        InterruptCheck(lambda: None, 0)
