"""Mutation test: deliberate bugs in our code, each of which a parity check must catch.

Each mutation patches OUR code (never diffusers', which the references run too, so a bug there would be on both
sides) for the duration of a context manager, and the check it names runs exactly as the real parity test does:
the same reference (diffusers' pipelines, or the independent fp8 reference), the same node path
(`tests.node_path.sample_node_path`, i.e. `sample_prepared`), the same tolerance constant, imported. Every check
also runs once without any mutation and must pass, so a mutation that "fails" cannot be a dead check.

Measured on the tiny models (relative error, and the tolerance constant of the check):

| mutation | check | error | tolerance |
|---|---|---|---|
| (none) | fp8 node path vs fp8 reference, median call | 1.2e-7 | FP8_REFERENCE_TOLERANCE 4e-7 |
| fp8 biases dropped | same | 1.5e-2 | 4e-7 |
| fp8 biases dropped | (too blunt) fp8 final latent vs eager fp32 | 8.1e-3, not caught | FP8_TOLERANCE 9e-3 |
| (none) | BFL file -> our loader + node path vs FluxPipeline | 3.5e-7 | parity TOLERANCE 1e-4 |
| last single block skipped | same | 3.6e-2 | 1e-4 |
| guidance 3.5 -> 1.0 | same | 7.6e-2 | 1e-4 |
| norm_out shift/scale not swapped | same | 1.3e-1 | 1e-4 |
| double block 0: shift/scale swapped | same | 3.9e-3 | 1e-4 |
| (none) | InstantX ControlNet vs FluxControlNetPipeline | 1.2e-7 | TOL 1e-4 |
| ControlNet block index off by one | same | 1.5e-1 | 1e-4 |
| (none) | XLabs ControlNet vs FluxControlNetPipeline | 0 | TOL 1e-4 |
| ControlNet cyclic rule taken as interval | same | 1.1e-2 | 1e-4 |
| (none) | LoRA stack vs diffusers load_lora_weights + set_adapters | 2.1e-7 | parity TOLERANCE 1e-4 |
| LoRA scale without alpha/r (6/4) | same | 6.3e-2 | 1e-4 |
| (none) | cache: reused call vs full call, ControlNet residuals | 1.4e-7 | CACHE_REUSE_TOLERANCE 1e-5 |
| cache reuses the ControlNet additions | same | 3.0e-1 | 1e-5 |

(`python -m pytest -q -p no:cacheprovider tests/test_mutations.py -o log_cli=true --log-cli-level=INFO` prints
them.)
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from diffusers import FluxTransformer2DModel

import fluxworks.flux_controlnet.residuals as residuals_module
import fluxworks.flux_models.transformer as transformer_module
import fluxworks.flux_speed.prepare as prepare_module
import fluxworks.flux_speed.step_cache as step_cache_module
from devtools.tiny_controlnets import random_controlnet
from devtools.tiny_models import write_flux
from fluxworks.flux_controlnet import ControlStack
from fluxworks.flux_lora.layers import PeftScaling
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_sampler.sampling import FluxDenoiser
from fluxworks.flux_speed.fp8_linear import Fp8Linear
from tests.controlnet.conftest import control_image, noise, prompt, sample, transformer, vae  # noqa: F401
from tests.controlnet.test_parity_diffusers import TOL as CONTROLNET_TOLERANCE
from tests.controlnet.test_parity_diffusers import controlnet_pipeline, loaded, run_pipeline, unit_for
from tests.lora.conftest import flux, pack  # noqa: F401
from tests.lora.test_parity_diffusers import TOLERANCE as LORA_TOLERANCE
from tests.lora.test_parity_diffusers import diffusers_latent as lora_reference_latent
from tests.lora.test_parity_diffusers import lora_files, ours_latent  # noqa: F401
from tests.lora.test_parity_diffusers import relative_error as lora_relative_error
from tests.parity.conftest import make_pipeline, rel_err, transformers_by_variant  # noqa: F401
from tests.parity.test_sampler_vs_diffusers import TOLERANCE as PIPELINE_TOLERANCE
from tests.parity.test_sampler_vs_diffusers import diffusers_latent, our_latent
from tests.speed.test_fp8_reference import FP8_REFERENCE_TOLERANCE, fp8_call_errors
from tests.speed.test_speed_modes import CACHE_REUSE_TOLERANCE, cond, controlnet_call_full_then_reused, model  # noqa: F401

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------- mutations


@contextlib.contextmanager
def fp8_biases_dropped() -> Iterator[None]:
    """Every Fp8Linear forgets its bias after quantising (the bias never reaches the fp8 product)."""
    original = Fp8Linear.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.bias = None

    with mock.patch.object(Fp8Linear, "__init__", init):
        yield


@contextlib.contextmanager
def last_single_block_skipped() -> Iterator[None]:
    """The prepared clone the sampler calls loses its last single-stream block (`clone_structure` recurses through
    the patched name, so only the top-level call, on the transformer itself, is changed)."""
    original = prepare_module.clone_structure

    def clone(module):
        new = original(module)
        if isinstance(module, FluxTransformer2DModel):
            new.single_transformer_blocks = torch.nn.ModuleList(list(new.single_transformer_blocks)[:-1])
        return new

    with mock.patch.object(prepare_module, "clone_structure", clone):
        yield


@contextlib.contextmanager
def guidance_scaled(factor: float) -> Iterator[None]:
    """The denoiser hands the transformer `factor` x the guidance value of the curve."""
    original = FluxDenoiser.transformer_inputs

    def inputs(self, x, sigma, conditioning, guidance):
        return original(self, x, sigma, conditioning, guidance * factor)

    with mock.patch.object(FluxDenoiser, "transformer_inputs", inputs):
        yield


@contextlib.contextmanager
def modulation_chunks_swapped(layer: str, chunks: int, first: int, second: int) -> Iterator[None]:
    """The BFL -> diffusers conversion the loader runs leaves chunks `first` and `second` of `layer`'s modulation
    output (weight rows and bias) exchanged. For `norm_out.linear` (2 chunks) that undoes the conversion's own
    (shift, scale) -> (scale, shift) swap, i.e. the conversion forgets it."""
    original = transformer_module.bfl_to_diffusers

    def convert(state):
        out = original(state)
        for suffix in ("weight", "bias"):
            parts = list(out[f"{layer}.{suffix}"].chunk(chunks))
            parts[first], parts[second] = parts[second], parts[first]
            out[f"{layer}.{suffix}"] = torch.cat(parts)
        return out

    with mock.patch.object(transformer_module, "bfl_to_diffusers", convert):
        yield


@contextlib.contextmanager
def control_indices(change: Callable[[Callable, int, int, bool], list[int]]) -> Iterator[None]:
    """`block_indices` (which ControlNet residual each transformer block receives) replaced by `change`, which gets
    the original function and its arguments."""
    original = residuals_module.block_indices

    def indices(depth: int, count: int, cyclic: bool) -> list[int]:
        return change(original, depth, count, cyclic)

    with mock.patch.object(residuals_module, "block_indices", indices):
        yield


def _next_residual(original, depth, count, cyclic):
    return [(i + 1) % count for i in original(depth, count, cyclic)]


def _rule_swapped(original, depth, count, cyclic):
    return original(depth, count, not cyclic)


@contextlib.contextmanager
def lora_scale_without_alpha_over_rank() -> Iterator[None]:
    """PEFT-style LoRAs (lora_alpha and r in the file's metadata) merged with scale 1 instead of lora_alpha / r."""
    with mock.patch.object(PeftScaling, "scale", lambda self, name, rank: 1.0):
        yield


@contextlib.contextmanager
def cache_keeps_controlnet_additions() -> Iterator[None]:
    """The step cache no longer notices ControlNet residuals in a call, so the residual it stores for reuse is the
    whole stack's, ControlNet additions included, and a reused step adds them a second time."""
    original = step_cache_module._EntryHook.pre_forward

    def pre_forward(self, module, *args, **kwargs):
        result = original(self, module, *args, **kwargs)
        self.state.current.with_control = False
        return result

    with mock.patch.object(step_cache_module._EntryHook, "pre_forward", pre_forward):
        yield


# -------------------------------------------------------------------------------------------------------- checks
# Each check returns (error, tolerance); its reference is computed once (module fixtures), outside any mutation.


@pytest.fixture(scope="module")
def pipeline_case(tmp_path_factory, transformers_by_variant):  # noqa: F811
    """test_sampler_vs_diffusers' BFL-file case for FLUX.1-dev: the file, the prompt and FluxPipeline's latent."""
    reference = transformers_by_variant["dev"]
    path = write_flux(str(tmp_path_factory.mktemp("flux") / "dev.safetensors"), reference, "bfl")
    torch.manual_seed(5)
    embeds, pooled = torch.randn(1, 24, 64), torch.randn(1, 64)
    return path, embeds, pooled, diffusers_latent(make_pipeline(reference, "dev"), embeds, pooled)


def pipeline_check(request) -> tuple[float, float]:
    """Our loader (BFL file) + the node path vs FluxPipeline, guidance 3.5 (tests/parity/test_sampler_vs_diffusers)."""
    path, embeds, pooled, expected = request.getfixturevalue("pipeline_case")
    loaded_model, config, _ = load_flux_transformer(path, "default", torch.float32)
    return rel_err(our_latent(loaded_model, config, embeds, pooled), expected), PIPELINE_TOLERANCE


@pytest.fixture(scope="module")
def controlnet_cases(tmp_path_factory, transformer, prompt, noise, vae):  # noqa: F811
    """test_one_controlnet_equals_flux_controlnet_pipeline's InstantX (interval rule) and XLabs (cyclic rule) cases:
    the loaded net, its control image and FluxControlNetPipeline's latent (strength 0.8)."""
    cases = {}
    for kind, fmt, singles in (("instantx", "diffusers", 2), ("xlabs", "xlabs", 0)):
        reference = random_controlnet(kind, 21, num_layers=2, num_single_layers=singles)
        image = control_image(1)
        expected = run_pipeline(controlnet_pipeline(transformer, reference, vae), prompt, noise, image,
                                controlnet_conditioning_scale=0.8)
        cases[kind] = loaded(tmp_path_factory.mktemp(kind), reference, fmt), image, expected
    return cases


def controlnet_check(kind: str):
    def check(request) -> tuple[float, float]:
        """Our ControlStack + node path vs FluxControlNetPipeline (tests/controlnet/test_parity_diffusers)."""
        net, image, expected = request.getfixturevalue("controlnet_cases")[kind]
        base, conditioning = request.getfixturevalue("transformer"), request.getfixturevalue("prompt")
        autoencoder, start = request.getfixturevalue("vae"), request.getfixturevalue("noise")
        stack = ControlStack([unit_for(net, autoencoder, image, strength=0.8)], base.config)
        return rel_err(sample(base, conditioning, start, stack), expected), CONTROLNET_TOLERANCE
    return check


LORA_STRENGTHS = (1.0, -0.5, 1.3)  # test_final_latent_matches_diffusers_set_adapters[three]


@pytest.fixture(scope="module")
def lora_case(pack, flux, lora_files):  # noqa: F811
    loras = list(zip(lora_files, LORA_STRENGTHS, strict=True))
    return loras, lora_reference_latent(flux, pack.loras_dir, loras)


def lora_check(request) -> tuple[float, float]:
    """The LoRA stack node + node path vs diffusers load_lora_weights/set_adapters (tests/lora/test_parity_diffusers):
    three diffusers-format LoRAs, one with lora_alpha = 6, r = 4 in its metadata."""
    loras, expected = request.getfixturevalue("lora_case")
    ours = ours_latent(request.getfixturevalue("pack"), request.getfixturevalue("flux"), loras)
    return lora_relative_error(ours, expected), LORA_TOLERANCE


def fp8_check(request) -> tuple[float, float]:
    """The median transformer call of an fp8 (rowwise) sampling run through the node path vs the independent fp8
    reference (tests/speed/test_fp8_reference)."""
    errors = fp8_call_errors(request.getfixturevalue("model"), request.getfixturevalue("cond"), "rowwise")
    return statistics.median(errors), FP8_REFERENCE_TOLERANCE["rowwise"]


def cache_reuse_check(request) -> tuple[float, float]:
    """A reused call vs the full call of a cached prepared transformer, identical inputs with ControlNet residuals
    (tests/speed/test_speed_modes::test_cache_reuse_adds_the_current_controlnet_residuals_once)."""
    full, reused, prepared = controlnet_call_full_then_reused(request.getfixturevalue("model"),
                                                             request.getfixturevalue("cond"))
    assert prepared.cache.hits == 1, "the second call must reuse the cache for this check to mean anything"
    return rel_err(reused, full), CACHE_REUSE_TOLERANCE


CHECKS: dict[str, Callable] = {
    "fp8_reference": fp8_check,
    "flux_pipeline": pipeline_check,
    "controlnet_instantx": controlnet_check("instantx"),
    "controlnet_xlabs": controlnet_check("xlabs"),
    "lora_set_adapters": lora_check,
    "cache_reuse_with_controlnet": cache_reuse_check,
}


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[], contextlib.AbstractContextManager]
    check: str


MUTATIONS = (
    Mutation("fp8_biases_dropped", fp8_biases_dropped, "fp8_reference"),
    Mutation("last_single_block_skipped", last_single_block_skipped, "flux_pipeline"),
    Mutation("guidance_3.5_becomes_1.0", lambda: guidance_scaled(1.0 / 3.5), "flux_pipeline"),
    Mutation("norm_out_shift_scale_not_swapped", lambda: modulation_chunks_swapped("norm_out.linear", 2, 0, 1),
             "flux_pipeline"),
    Mutation("double_block_shift_scale_swapped",
             lambda: modulation_chunks_swapped("transformer_blocks.0.norm1.linear", 6, 0, 1), "flux_pipeline"),
    Mutation("controlnet_block_index_off_by_one", lambda: control_indices(_next_residual), "controlnet_instantx"),
    Mutation("controlnet_cyclic_rule_as_interval", lambda: control_indices(_rule_swapped), "controlnet_xlabs"),
    Mutation("lora_scale_without_alpha_over_rank", lora_scale_without_alpha_over_rank, "lora_set_adapters"),
    Mutation("cache_keeps_controlnet_additions", cache_keeps_controlnet_additions, "cache_reuse_with_controlnet"),
)


@pytest.mark.parametrize("check", list(CHECKS))
def test_check_passes_without_mutations(request, check):
    error, tolerance = CHECKS[check](request)
    logger.info("%s: unmutated error %.3g (tolerance %.3g)", check, error, tolerance)
    assert error <= tolerance, f"{check} fails without any mutation: {error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_is_caught(request, mutation):
    with mutation.apply():
        error, tolerance = CHECKS[mutation.check](request)
    logger.info("%s: %s error %.3g (tolerance %.3g)", mutation.name, mutation.check, error, tolerance)
    assert error > tolerance, f"{mutation.name} passes {mutation.check}: {error:.3g} <= {tolerance:.3g}"
