"""Block offload through the FluxWorks Speed node and FluxWorks Sampler inside an in-process ComfyUI host (CPU,
where BlockOffloader streams without copies): the input is optional and off by default, an offloaded run gives
the latent a full load gives, LoRA patches are applied while streaming, and the model is left clean for the next
prompt."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures
from tests.lora.lora_helpers import conditioning, make_patcher

LORA_KEYS = ("transformer.transformer_blocks.0.attn.to_q.weight",  # resident with 1 resident block
             "transformer.single_transformer_blocks.0.proj_out.weight")  # streamed


def run_sampler(fluxworks, patcher) -> torch.Tensor:
    text = conditioning()
    positive = [[text.embeds, {"pooled_output": text.pooled}]]
    (out,) = fluxworks.nodes.sampler.FluxWorksSampler().sample(
        patcher, positive, {"samples": torch.zeros(1, 16, 8, 8)}, seed=3, steps=3, guidance=3.5, shift=0.0,
        denoise=1.0)
    return out["samples"]


def with_offload(patcher, resident: int):
    speed = importlib.import_module("fluxworks.nodes.speed")
    (out,) = speed.FluxWorksSpeed().apply(patcher, False, False, "auto", offload_resident_blocks=resident)
    return out


def with_lora(patcher, seed: int = 5):
    """A clone with dense weight deltas on one resident and one streamed block, as LoRA loading produces."""
    g = torch.Generator().manual_seed(seed)
    weights = patcher.model.state_dict()
    clone = patcher.clone()
    clone.add_patches({k: (0.05 * torch.randn(weights[k].shape, generator=g),) for k in LORA_KEYS}, 1.0)
    return clone


def test_offload_input_is_optional_and_off_by_default(pack, flux):  # noqa: F811
    speed = importlib.import_module("fluxworks.nodes.speed")
    spec = speed.FluxWorksSpeed.INPUT_TYPES()
    assert "offload_resident_blocks" not in spec["required"]  # saved workflows keep their widget order
    assert spec["optional"]["offload_resident_blocks"][1]["default"] == -1
    patcher = make_patcher(pack, flux)
    (saved_workflow,) = speed.FluxWorksSpeed().apply(patcher, False, False, "auto")
    assert not speed.speed_options(saved_workflow).offload
    assert speed.speed_options(with_offload(patcher, 12)).offload_resident_blocks == 12


def test_bad_offload_values_are_refused_clearly(pack, flux):  # noqa: F811
    speed = importlib.import_module("fluxworks.nodes.speed")
    patcher = make_patcher(pack, flux)
    with pytest.raises(ValueError, match="offload_resident_blocks must be -1"):
        speed.FluxWorksSpeed().apply(patcher, False, False, "auto", offload_resident_blocks=-2)
    with pytest.raises(ValueError, match="calibrated fp8 activations cannot be combined with block offload"):
        speed.FluxWorksSpeed().apply(patcher, False, True, "auto", fp8_activations="calibrated",
                                     offload_resident_blocks=0)


@pytest.mark.parametrize("resident", [0, 1])
def test_offloaded_sampling_matches_full_load_and_leaves_model_clean(pack, flux, resident,  # noqa: F811
                                                                    monkeypatch):
    patcher = make_patcher(pack, flux)
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    full = run_sampler(pack, patcher)  # leaves the model loaded by ComfyUI's memory manager
    offloader = importlib.import_module("fluxworks.flux_speed.offload").BlockOffloader
    fetched = []
    fetch = offloader.fetch
    monkeypatch.setattr(offloader, "fetch", lambda self, block: fetched.append(block) or fetch(self, block))
    streamed = run_sampler(pack, with_offload(patcher, resident))
    assert fetched  # the blocks really went through the offloader
    monkeypatch.undo()
    torch.testing.assert_close(streamed, full, rtol=0, atol=0)
    after = patcher.model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base)
    torch.testing.assert_close(run_sampler(pack, patcher), full, rtol=0, atol=0)  # the next prompt, full load


def test_offload_applies_lora_patches_and_restores_the_base(pack, flux):  # noqa: F811
    patcher = make_patcher(pack, flux)
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    plain = run_sampler(pack, patcher)
    lora_full = run_sampler(pack, with_lora(patcher))
    lora_streamed = run_sampler(pack, with_offload(with_lora(patcher), 1))
    assert not torch.equal(lora_full, plain)  # the patches matter
    torch.testing.assert_close(lora_streamed, lora_full, rtol=0, atol=0)
    after = patcher.model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base)  # unpatched for the next prompt
    torch.testing.assert_close(run_sampler(pack, patcher), plain, rtol=0, atol=0)
