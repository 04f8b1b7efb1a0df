"""FluxWorksLoraStack / FluxWorksApplyLoraStack inside an in-process ComfyUI host on the CPU: strengths,
order, the untouched base patcher, in-place stack switching, fp8 weights and text-encoder LoRAs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from devtools.tiny_loras import lora_state, random_lora, sdxl_lora, write_lora
from fluxworks.flux_models.transformer import load_flux_transformer
from tests.lora.lora_helpers import (
    expected_weights,
    loaded_weights,
    make_patcher,
    max_difference,
    relative_error,
    sample,
    sample_patcher,
)


@pytest.fixture(scope="module")
def loras(pack, flux, text_encoders):
    """name -> TinyLora for three LoRA files (kohya, diffusers, BFL) in the session's loras folder."""
    _, clip = text_encoders
    out = {}
    for seed, fmt in ((21, "kohya"), (22, "diffusers"), (23, "bfl")):
        lora = random_lora(flux, rank=4, alpha=6.0, seed=seed, layers="all", clip=clip if fmt == "kohya" else None)
        name = f"node_{fmt}.safetensors"
        write_lora(os.path.join(pack.loras_dir, name), *lora_state(lora, fmt))
        out[name] = lora
    return out


def apply(pack, patcher, stack, text_encoder=None, **optional):
    return pack.nodes.lora.FluxWorksApplyLoraStack().apply(patcher, stack, text_encoder, **optional)


def test_stack_rows_from_json_any_number_and_chained(pack, loras):
    names = sorted(loras)
    node = pack.nodes.lora.FluxWorksLoraStack()
    rows = [{"lora": names[0], "strength": 0.5}, {"lora": names[1], "strength": -1, "enabled": False},
            {"lora": names[2], "strength": 2, "text_strength": 0}, {"lora": names[0], "enabled": True},
            {"lora": names[1], "strength": 0.25}]
    (stack,) = node.build(json.dumps(rows), lora_stack=[(names[2], 0.3, 0.1)])
    assert stack == [(names[2], 0.3, 0.1), (names[0], 0.5, 0.5), (names[2], 2.0, 0.0), (names[0], 1.0, 1.0),
                     (names[1], 0.25, 0.25)]
    validate = pack.nodes.lora.FluxWorksLoraStack.VALIDATE_INPUTS
    assert validate(json.dumps(rows)) is True
    assert "not valid JSON" in validate("[{")
    assert "unknown keys ['weight']" in validate(json.dumps([{"lora": names[0], "weight": 1}]))
    assert "strength must be a number" in validate(json.dumps([{"lora": names[0], "strength": "1"}]))
    assert "not found in models/loras: nope.safetensors" in validate(json.dumps([{"lora": "nope.safetensors"}]))


def test_base_patcher_is_untouched_and_restored(pack, flux, loras):
    base = make_patcher(pack, flux)
    original = loaded_weights(pack, base)
    name = sorted(loras)[0]
    patched, _, _ = apply(pack, base, [(name, 1.0, 1.0)])["result"]
    assert base.patches == {} and patched.model is base.model and patched is not base
    assert max_difference(dict(base.model.transformer.state_dict()), original) == 0.0  # nothing merged yet
    with_lora = loaded_weights(pack, patched)
    assert max_difference(with_lora, expected_weights(original, loras[name].dense_deltas())) < 1e-6
    assert max_difference(loaded_weights(pack, base), original) == 0.0


def test_strength_zero_and_disabled_rows_give_exactly_the_base_model(pack, flux, loras):
    base = make_patcher(pack, flux)
    original, reference = loaded_weights(pack, base), sample_patcher(pack, base)
    names = sorted(loras)
    (stack,) = pack.nodes.lora.FluxWorksLoraStack().build(json.dumps(
        [{"lora": names[0], "strength": 0.0}, {"lora": names[1], "strength": 1.0, "enabled": False}]))
    patched, _, applied = apply(pack, base, stack)["result"]
    assert max_difference(loaded_weights(pack, patched), original) == 0.0
    assert torch.equal(sample_patcher(pack, patched), reference)
    assert [r["name"] for r in json.loads(applied)] == [names[0]]


def test_row_order_does_not_change_a_single_bit(pack, flux, loras):
    names = sorted(loras)
    stacks = [[(names[0], 0.7, 0.7), (names[1], -0.4, -0.4), (names[2], 1.2, 1.2)],
              [(names[2], 1.2, 1.2), (names[0], 0.7, 0.7), (names[1], -0.4, -0.4)]]
    results = [loaded_weights(pack, apply(pack, make_patcher(pack, flux), s)["result"][0]) for s in stacks]
    assert max_difference(*results) == 0.0


def test_weights_are_linear_in_strength(pack, flux, loras):
    base = make_patcher(pack, flux)
    original = loaded_weights(pack, base)
    name = sorted(loras)[1]
    def delta(strength: float) -> dict[str, torch.Tensor]:
        got = loaded_weights(pack, apply(pack, base, [(name, strength, strength)])["result"][0])
        return {k: v - original[k] for k, v in got.items()}

    unit = delta(1.0)
    for strength in (-1.0, 0.5, 2.5):
        assert max_difference(delta(strength), {k: strength * v for k, v in unit.items()}) < 1e-5


def test_switching_stacks_in_place_equals_a_fresh_load_and_restores_the_base(pack, flux, loras, monkeypatch):
    names = sorted(loras)
    base = make_patcher(pack, flux)
    original = loaded_weights(pack, base)
    first, _, _ = apply(pack, base, [(names[0], 1.0, 1.0)])["result"]
    second, _, _ = apply(pack, base, [(names[1], 0.6, 0.6), (names[2], 1.0, 1.0)])["result"]
    empty, _, _ = apply(pack, base, [])["result"]
    switches = []
    switch = pack.nodes.host.FastSwitchPatcher._switch_weights
    monkeypatch.setattr(pack.nodes.host.FastSwitchPatcher, "_switch_weights",
                        lambda self, device: switches.append(self) or switch(self, device))
    loaded_weights(pack, first)
    after_switch = loaded_weights(pack, second)
    assert switches == [first, second], "each stack should be switched in place, not reloaded"
    fresh = loaded_weights(pack, apply(pack, make_patcher(pack, flux), [(names[1], 0.6, 0.6), (names[2], 1.0, 1.0)])
                           ["result"][0])
    assert max_difference(after_switch, fresh) == 0.0
    assert max_difference(loaded_weights(pack, empty), original) == 0.0
    assert base.backup == {}  # every original is back in the model
    assert max_difference(loaded_weights(pack, first), loaded_weights(pack, apply(
        pack, make_patcher(pack, flux), [(names[0], 1.0, 1.0)])["result"][0])) == 0.0


def test_switches_keep_originals_on_the_device_within_the_budget_and_equal_a_fresh_load(pack, flux, loras,
                                                                                          monkeypatch):
    names = sorted(loras)
    base = make_patcher(pack, flux)
    original = loaded_weights(pack, base)
    switched = []
    switch = pack.nodes.host.FastSwitchPatcher._switch_weights
    monkeypatch.setattr(pack.nodes.host.FastSwitchPatcher, "_switch_weights",
                        lambda self, device: switched.append(self) or switch(self, device))
    kept_bytes = {}
    # The budget changes between prompts too: originals above the new budget leave the device.
    for fraction, stack in ((1.0, [(names[0], 1.0, 1.0)]), (0.05, [(names[1], 0.6, 0.6), (names[2], 1.0, 1.0)]),
                            (0.0, [(names[2], -0.5, -0.5)]), (0.05, [(names[0], 0.3, 0.3), (names[1], 1.0, 1.0)])):
        patched = apply(pack, base, stack, switch_vram=fraction)["result"][0]
        weights = loaded_weights(pack, patched)
        assert switched[-1] is patched, "the stack should be switched in place, not reloaded"
        kept = patched.originals_on_device()
        all_originals = sum(b.weight.numel() * b.weight.element_size() for b in base.backup.values())
        assert kept <= int(fraction * base.model_size())
        assert len(base.backup) == len(patched.patches) > 0
        kept_bytes[fraction] = (kept, all_originals)
        fresh = apply(pack, make_patcher(pack, flux), stack)["result"][0]
        assert max_difference(weights, loaded_weights(pack, fresh)) == 0.0
    assert kept_bytes[1.0][0] == kept_bytes[1.0][1]  # everything fits a budget of the whole model
    assert kept_bytes[0.0][0] == 0
    assert 0 < kept_bytes[0.05][0] < kept_bytes[0.05][1]  # part on the device, part in CPU memory
    assert max_difference(loaded_weights(pack, apply(pack, base, [])["result"][0]), original) == 0.0
    assert base.backup == {}


def test_switch_vram_is_optional_and_checked(pack, flux, loras):
    spec = pack.nodes.lora.FluxWorksApplyLoraStack.INPUT_TYPES()
    assert list(spec["required"]) == ["flux_model", "lora_stack"]
    assert list(spec["optional"]) == ["text_encoder", "switch_vram"]  # new inputs append: saved widgets keep order
    assert spec["optional"]["switch_vram"][1]["default"] == pack.nodes.host.DEFAULT_ORIGINALS_FRACTION
    patched = apply(pack, make_patcher(pack, flux), [(sorted(loras)[0], 1.0, 1.0)])["result"][0]
    assert patched.originals_fraction == pack.nodes.host.DEFAULT_ORIGINALS_FRACTION
    assert patched.clone().originals_fraction == pack.nodes.host.DEFAULT_ORIGINALS_FRACTION
    for bad in (1.5, -0.1, "0.2", True):
        with pytest.raises(ValueError, match=r"switch_vram must be a number from 0 to 1 .* got"):
            apply(pack, make_patcher(pack, flux), [], switch_vram=bad)


def test_a_flux_model_outside_a_fluxworks_patcher_is_refused_by_name(pack, flux, loras):
    import comfy.model_patcher

    holder = make_patcher(pack, flux).model
    plain = comfy.model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(TypeError, match="patcher is a ModelPatcher, not the FastSwitchPatcher"):
        apply(pack, plain, [(sorted(loras)[0], 1.0, 1.0)])


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory, flux):
    from devtools.tiny_models import write_flux

    return write_flux(str(tmp_path_factory.mktemp("fp8") / "flux1-dev-tiny.safetensors"), flux)


def test_fp8_model_with_lora_stays_fp8_and_tracks_bf16(pack, flux_file, loras):
    results = {}
    for weight_dtype in ("bf16", "fp8_e4m3fn"):
        transformer, _, compute = load_flux_transformer(flux_file, weight_dtype, torch.bfloat16)
        base = make_patcher(pack, transformer, compute, private_copy=False)
        name = sorted(loras)[0]
        patched, _, _ = apply(pack, base, [(name, 1.0, 1.0)])["result"]
        stored = {n: p.dtype for n, p in transformer.named_parameters()}
        results[weight_dtype] = (sample_patcher(pack, base), sample_patcher(pack, patched))
        assert {n: p.dtype for n, p in transformer.named_parameters()} == stored, "no weight may stay upcast"
        if weight_dtype == "fp8_e4m3fn":
            assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    (bf16_base, bf16_lora), (fp8_base, fp8_lora) = results["bf16"], results["fp8_e4m3fn"]
    assert torch.isfinite(fp8_lora).all()
    lora_effect = relative_error(bf16_lora, bf16_base)
    assert lora_effect > 0.05
    assert relative_error(fp8_lora, bf16_lora) < 0.15 * lora_effect  # measured: 0.03 vs an effect of 0.32
    cosine = torch.nn.functional.cosine_similarity((fp8_lora - fp8_base).flatten(), (bf16_lora - bf16_base).flatten(),
                                                   dim=0)
    assert cosine > 0.98  # the LoRA moves the fp8 image the way it moves the bf16 one (measured 0.997)


def test_text_encoder_lora_patches_clip_with_text_strength(pack, flux, text_encoders, loras):
    t5, clip = (copy.deepcopy(m) for m in text_encoders)
    holder = pack.flux_models.holders.FluxTextEncoder(t5, clip, None, torch.float32, ("t5", "clip"))
    te = pack.nodes.host.wrap_patcher(holder, torch.device("cpu"), torch.device("cpu"))
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    name = next(n for n, lora in loras.items() if lora.text)
    _, new_te, applied = apply(pack, make_patcher(pack, flux), [(name, 1.0, 0.5)], te)["result"]
    pack.nodes.host.load_on_device(new_te)
    after = holder.state_dict()
    flattened = not any(k.startswith("clip.text_model.") for k in before)
    for canonical, delta in loras[name].text_deltas().items():
        key = f"clip.{canonical.removeprefix('text_model.') if flattened else canonical}.weight"
        assert torch.allclose(after[key], before[key] + 0.5 * delta, atol=1e-6)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("t5."))
    assert json.loads(applied)[0]["patched"]["clip"] == len(loras[name].text)
    _, untouched, _ = apply(pack, make_patcher(pack, flux), [(name, 1.0, 0.0)], te)["result"]
    assert untouched.patches == {}


def test_unmatched_keys_reach_the_output_and_wrong_architecture_fails(pack, flux, loras):
    state, metadata = lora_state(loras["node_bfl.safetensors"], "kohya")
    state["lora_unet_double_blocks_9_img_attn_proj.lora_down.weight"] = torch.zeros(4, 256)
    state["lora_unet_double_blocks_9_img_attn_proj.lora_up.weight"] = torch.zeros(256, 4)
    write_lora(os.path.join(pack.loras_dir, "partly.safetensors"), state, metadata)
    out = apply(pack, make_patcher(pack, flux), [("partly.safetensors", 1.0, 1.0)])
    [record] = json.loads(out["result"][2])
    assert [u.split(" ")[0] for u in record["unmatched"]] == [
        "lora_unet_double_blocks_9_img_attn_proj.lora_down.weight",
        "lora_unet_double_blocks_9_img_attn_proj.lora_up.weight"]
    assert "lora_unet_double_blocks_9_img_attn_proj.lora_down.weight" in out["ui"]["text"][0]
    assert record["sha256"] and record["size"] == os.path.getsize(os.path.join(pack.loras_dir, "partly.safetensors"))
    write_lora(os.path.join(pack.loras_dir, "sdxl_style.safetensors"), sdxl_lora())
    with pytest.raises(ValueError, match="sdxl_style.safetensors: none of its 12 keys.*SDXL"):
        apply(pack, make_patcher(pack, flux), [("sdxl_style.safetensors", 1.0, 1.0)])


def test_metadata_is_recorded_on_the_model_options(pack, flux, loras):
    name = "node_bfl.safetensors"
    patched, _, applied = apply(pack, make_patcher(pack, flux), [(name, 0.75, 0.75)])["result"]
    [record] = patched.model_options["transformer_options"]["fluxworks_loras"]
    assert record == json.loads(applied)[0]
    assert (record["name"], record["strength"], record["format"]) == (name, 0.75, "BFL/ComfyUI LoRA")


def test_sampling_with_the_lora_uses_the_merged_weights(pack, flux, loras):
    name = sorted(loras)[1]
    patched, _, _ = apply(pack, make_patcher(pack, flux), [(name, 1.0, 1.0)])["result"]
    merged = copy.deepcopy(flux)
    merged.load_state_dict(expected_weights(flux.state_dict(), loras[name].dense_deltas()))
    assert relative_error(sample_patcher(pack, patched), sample(merged)) < 1e-5
