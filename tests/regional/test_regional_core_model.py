# ruff: noqa: F811 - pytest fixtures imported from tests.lora.conftest are parameters here
"""FluxWorks Regional Core Model: core's KSampler on a core MODEL of the tiny FLUX.1 (FluxWorks Load Core Model's
loading path) with the regional patch lands where FluxWorks Sampler lands with the same regional conditioning, and
the patch's own behaviour: positive chunk only, chosen blocks only, inside the window, other wrappers kept."""

from __future__ import annotations

import math

import pytest
import torch

from devtools.tiny_models import random_flux, write_flux
from tests.lora.conftest import pack  # noqa: F401 - the shared in-process host
from tests.lora.lora_helpers import conditioning, make_patcher

SEED, STEPS, GUIDANCE = 3, 10, 3.5  # 10 steps: core's simple scheduler is the exact shifted schedule (see
CORE_SHIFT = 1.15  # tests/embedded/test_core_loaders.py); ModelSamplingFlux's default mu, our shift is e^mu
LATENT = (1, 16, 16, 16)  # 128x128 pixels: 8x8 tokens


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    transformer = random_flux("dev", 0)
    path = write_flux(str(tmp_path_factory.mktemp("regional_core") / "tiny.safetensors"), transformer)
    core = pack.nodes.host.core_flux_model(pack.flux_models.transformer.read_flux_file(path), "default")
    return core, make_patcher(pack, transformer)


def core_cond(cond, **extras):
    return [[cond.embeds, {"pooled_output": cond.pooled, **extras}]]


def regions(pack, blocks: str = "all", end: float = 1.0):
    node = pack.nodes.regional.FluxWorksRegionalPrompt()
    rows = '[{"x": 0, "y": 0, "w": 0.5, "h": 1}, {"x": 0.5, "y": 0.25, "w": 0.5, "h": 0.5, "strength": 2.0}]'
    (out,) = node.build(core_cond(conditioning(1)), rows, 0.0, end, blocks, conditioning_1=core_cond(conditioning(2)),
                        conditioning_2=core_cond(conditioning(3)))
    return out


def ksampler(model, positive, negative=None, cfg: float = 1.0):
    import nodes

    guided = [[t, {**e, "guidance": GUIDANCE}] for t, e in positive]
    negative = negative or [[t, {**e, "guidance": GUIDANCE}] for t, e in core_cond(conditioning(4))]
    (out,) = nodes.common_ksampler(model, SEED, STEPS, cfg, "euler", "simple", guided, negative,
                                   {"samples": torch.zeros(LATENT)})
    return out["samples"]


def fluxworks(pack, patcher, positive):
    sampler = pack.nodes.sampler.FluxWorksSampler()
    (out,) = sampler.sample(patcher, positive, {"samples": torch.zeros(LATENT)}, seed=SEED, steps=STEPS,
                            guidance=GUIDANCE, shift=math.exp(CORE_SHIFT), denoise=1.0)
    return out["samples"]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("blocks,end", [("all", 1.0), ("single", 0.5)])
def test_ksampler_with_the_patch_matches_the_fluxworks_sampler(pack, models, blocks, end):
    core, ours = models
    cond = regions(pack, blocks, end)
    node = pack.nodes.regional.FluxWorksRegionalCoreModel()
    (patched,) = node.apply(core, cond)
    expected = fluxworks(pack, ours, cond)  # measured 2.2e-7 from KSampler (core FLUX.1 vs diffusers, fp32)
    got = ksampler(patched, core_cond(conditioning(1)))
    plain = ksampler(core, core_cond(conditioning(1)))
    assert rel(got, expected) <= 6e-7, f"regional KSampler vs FluxWorks Sampler: {rel(got, expected):.2e}"
    assert rel(plain, expected) > 1e-3  # the regions do change the picture (measured 4.7e-3 on random weights)


def test_negative_chunk_is_unmasked_and_other_wrappers_still_run(pack, models):
    core, _ = models
    seen = []

    def spy(apply_model, args):
        seen.append((list(args["cond_or_uncond"]), args["c"]["c_crossattn"].shape[1],
                     "fluxworks_regional_mask" in args["c"]["transformer_options"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = core.clone()
    wrapped.set_model_unet_function_wrapper(spy)
    (patched,) = pack.nodes.regional.FluxWorksRegionalCoreModel().apply(wrapped, regions(pack, "all", 0.5))
    out = ksampler(patched, core_cond(conditioning(1)), cfg=2.0)
    assert torch.isfinite(out).all()
    assert len(seen) == 2 * STEPS  # each step: the positive chunk and the negative chunk, each in its own call
    for step in range(STEPS):
        (pos, neg) = sorted(seen[2 * step: 2 * step + 2], key=lambda s: s[0])
        in_window = step / (STEPS - 1) <= 0.5
        assert pos == ([0], 24, in_window)  # 8 global + 2 x 8 region tokens; masked inside the window only
        assert neg == ([1], 8, False)


def test_bad_regions_are_refused(pack, models):
    core, _ = models
    node = pack.nodes.regional.FluxWorksRegionalCoreModel()
    with pytest.raises(ValueError, match="regions has no region"):
        node.apply(core, core_cond(conditioning(1)))
    import nodes

    (empty,) = nodes.ConditioningSetMask().append(core_cond(conditioning(2)), torch.zeros(1, 64, 64), "default", 1.0)
    with pytest.raises(ValueError, match="mask is empty"):
        node.apply(core, empty)
