"""Every LoRA file format, converted onto the tiny FLUX.1 (pure torch, no ComfyUI).

The oracle adds each LoRA's dense delta to the BFL-layout weights and converts them with the model loader's own
BFL -> diffusers code; the merged weights from each file format must equal it, and equal the diffusers format.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from devtools.tiny_loras import (
    LORA_FORMATS,
    LYCORIS_FORMATS,
    lora_state,
    lycoris_state,
    random_lora,
    random_lycoris,
    sdxl_lora,
    write_lora,
)
from fluxworks.flux_lora import (
    Kronecker,
    LoraMismatchError,
    LowRank,
    RouteTable,
    convert_lora,
    linear_shapes,
    read_lora_file,
    summed_delta,
)
from fluxworks.flux_lora.layers import PeftScaling
from tests.lora.lora_helpers import expected_weights, max_difference

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def table(flux, text_encoders):
    t5, clip = text_encoders
    return RouteTable.build(linear_shapes(flux, "transformer."),
                            {**linear_shapes(clip, "clip."), **linear_shapes(t5, "t5.")})


def convert(written: tuple[dict, dict], table, **kwargs):
    state, metadata = written
    return convert_lora(state, table, metadata, **kwargs)


def merged(base: dict[str, torch.Tensor], converted, strength: float = 1.0) -> dict[str, torch.Tensor]:
    out = dict(base)
    for key, adapters in converted.component_patches("transformer").items():
        name = key[len("transformer."):]
        out[name] = out[name] + strength * summed_delta(adapters, CPU)
    return out


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_each_lora_format_equals_the_dense_oracle_and_the_diffusers_format(fmt, flux, table, base_state):
    lora = random_lora(flux, rank=4, alpha=6.0, seed=3, layers="xlabs" if fmt == "xlabs" else "all")
    state, metadata = lora_state(lora, fmt)
    converted = convert_lora(state, table, metadata, source=fmt)
    assert converted.unmatched == ()
    expected = expected_weights(base_state, lora.dense_deltas())
    assert max_difference(expected, base_state) > 1e-2, "the LoRA must change the weights visibly"
    assert max_difference(merged(base_state, converted), expected) < 1e-6
    reference = convert(lora_state(lora, "diffusers"), table)
    assert max_difference(merged(base_state, converted), merged(base_state, reference)) < 1e-6


def test_formats_are_detected_by_name(flux, table):
    lora = random_lora(flux, seed=4, layers="xlabs")
    labels = {fmt: convert(lora_state(lora, fmt), table).format for fmt in
              ("diffusers", "peft_wrapped", "kohya", "bfl", "ai_toolkit", "onetrainer", "xlabs")}
    assert labels == {"diffusers": "diffusers/PEFT LoRA", "peft_wrapped": "PEFT LoRA", "kohya": "kohya LoRA",
                      "bfl": "BFL/ComfyUI LoRA", "ai_toolkit": "ai-toolkit LoRA", "onetrainer": "OneTrainer LoRA",
                      "xlabs": "XLabs LoRA"}


@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize("fmt", LYCORIS_FORMATS)
def test_lycoris_formats_equal_the_independent_dense_delta(kind, fmt, flux, table, base_state):
    lycoris = random_lycoris(flux, kind, rank=4, alpha=2.0, seed=5, fused=fmt != "simpletuner")
    converted = convert(lycoris_state(lycoris, fmt), table, source=f"{kind} {fmt}")
    assert converted.unmatched == ()
    assert converted.format.endswith("LoKr" if kind == "lokr" else "LoHa")
    expected = expected_weights(base_state, lycoris.dense_deltas())
    assert max_difference(expected, base_state) > 1e-3
    assert max_difference(merged(base_state, converted), expected) < 1e-6
    assert max_difference(merged(base_state, converted, 0.5), expected_weights(
        base_state, {k: 0.5 * v for k, v in lycoris.dense_deltas().items()})) < 1e-6


def test_lokr_split_keeps_kronecker_factors_where_rows_align(flux, table):
    lycoris = random_lycoris(flux, "lokr", seed=6)
    converted = convert(lycoris_state(lycoris, "kohya"), table)
    kinds = {type(a).__name__ for adapters in converted.patches["transformer"].values() for a in adapters}
    assert kinds == {"Kronecker", "RowSlice"}  # aligned q/k/v splits stay factored, the others slice lazily


def test_fused_qkv_split_matches_dense_slicing():
    g = torch.Generator().manual_seed(0)
    low = LowRank(torch.randn(12, 3, generator=g), torch.randn(3, 5, generator=g), 0.5)
    rows = ((8, 12), (0, 4))
    dense = low.delta(CPU, torch.float32)
    assert torch.allclose(low.take_rows(rows).delta(CPU, torch.float32), torch.cat([dense[8:12], dense[0:4]]))
    kron = Kronecker(torch.randn(3, 2, generator=g), None, torch.randn(4, 2, generator=g),
                     torch.randn(2, 3, generator=g), 0.7)
    dense = kron.delta(CPU, torch.float32)
    for rows in (((4, 8),), ((0, 6),), ((6, 12), (0, 2))):
        expected = torch.cat([dense[a:b] for a, b in rows])
        assert torch.allclose(kron.take_rows(rows).delta(CPU, torch.float32), expected, atol=1e-6)


def test_block_diagonal_kohya_split_qkv_keeps_only_each_parts_rank(flux, table):
    lora = random_lora(flux, rank=4, seed=7, layers="all")
    converted = convert(lora_state(lora, "kohya_split_qkv"), table)
    [to_q] = converted.patches["transformer"]["transformer.transformer_blocks.0.attn.to_q.weight"]
    assert to_q.up.shape[1] == 4  # stored rank 12 (3 x 4), the zero blocks dropped


def test_text_encoder_layers_in_kohya_and_diffusers_names(flux, table, text_encoders):
    _, clip = text_encoders
    flattened = not any(name.startswith("text_model.") for name, _ in clip.named_modules())
    lora = random_lora(flux, rank=4, alpha=6.0, seed=8, layers="attention_mlp", clip=clip)
    kohya = convert(lora_state(lora, "kohya"), table).patches["clip"]
    diffusers = convert(lora_state(lora, "diffusers"), table).patches["clip"]
    expected = {f"clip.{n.removeprefix('text_model.') if flattened else n}.weight": d
                for n, d in lora.text_deltas().items()}
    assert kohya.keys() == diffusers.keys() == expected.keys()
    for key, delta in expected.items():
        assert torch.allclose(summed_delta(kohya[key], CPU), delta, atol=1e-7)
        assert torch.allclose(summed_delta(diffusers[key], CPU), delta, atol=1e-7)


def test_text_layers_without_a_text_encoder_are_reported_not_fatal(flux, text_encoders):
    _, clip = text_encoders
    lora = random_lora(flux, seed=9, layers="attention_mlp", clip=clip)
    converted = convert(lora_state(lora, "kohya"), RouteTable.build(linear_shapes(flux, "transformer.")))
    assert converted.unmatched and all("connect a FLUX_TEXT_ENCODER" in u.reason for u in converted.unmatched)
    assert "transformer" in converted.patches


def test_unmatched_keys_are_listed_and_the_rest_applied(flux, table):
    state, metadata = lora_state(random_lora(flux, seed=10, layers="attention_mlp"), "kohya")
    extra = {"lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": torch.zeros(4, 256),
             "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": torch.zeros(256, 4),
             "lora_unet_double_blocks_0_img_attn_norm_query_norm.lora_up.weight": torch.zeros(128, 4),
             "emb_params": torch.zeros(2, 64)}
    converted = convert_lora({**state, **extra}, table, metadata)
    assert sorted(u.key for u in converted.unmatched) == sorted(extra)
    assert converted.layers_matched == 8 + 2 * 2  # 8 double-block and 2 x 2 single-block layers


def test_wrong_architecture_fails_with_a_clear_error(table):
    with pytest.raises(LoraMismatchError, match="SDXL"):
        convert_lora(sdxl_lora(), table, source="sdxl_style.safetensors")


def test_lora_for_full_size_flux_on_a_smaller_model_says_so(table):
    state = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(16, 3072),
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 16)}
    with pytest.raises(LoraMismatchError, match="another size"):
        convert_lora(state, table, source="big.safetensors")


def test_dora_is_refused_by_name(flux, table):
    state, _ = lora_state(random_lora(flux, seed=11, layers="attention_mlp"), "kohya")
    state["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(256, 1)
    with pytest.raises(ValueError, match="double_blocks_0_img_attn_proj.*DoRA"):
        convert_lora(state, table, source="dora.safetensors")


def test_peft_scaling_follows_alpha_and_rank_patterns_and_rslora():
    scaling = PeftScaling(lora_alpha=8, r=4, alpha_pattern={"attn.to_q": 2}, rank_pattern={"proj_out": 16})
    assert scaling.scale("transformer_blocks.0.attn.to_k", 4) == 2.0
    assert scaling.scale("transformer_blocks.0.attn.to_q", 4) == 0.5
    assert scaling.scale("single_transformer_blocks.1.proj_out", 16) == 0.5
    assert PeftScaling(lora_alpha=8, r=16, use_rslora=True).scale("x", 16) == 2.0


def test_reading_files_bf16_metadata_adapter_config_and_broken_files(tmp_path, flux, table, base_state):
    lora = random_lora(flux, rank=4, alpha=6.0, seed=12, layers="attention_mlp")
    state, metadata = lora_state(lora, "diffusers_metadata")
    path = write_lora(str(tmp_path / "bf16.safetensors"), state, metadata, dtype=torch.bfloat16)
    file = read_lora_file(path)
    assert file.size == os.path.getsize(path) and len(file.sha256) == 64
    converted = convert_lora(file.tensors, table, file.metadata)
    assert max_difference(merged(base_state, converted), expected_weights(base_state, lora.dense_deltas())) < 2e-2

    peft_dir = tmp_path / "peft"
    state, _ = lora_state(lora, "peft_wrapped")
    unscaled = {k: (v / lora.scale if ".lora_B." in k else v) for k, v in state.items()}
    write_lora(str(peft_dir / "adapter_model.safetensors"), unscaled)
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 6.0}))
    file = read_lora_file(str(peft_dir / "adapter_model.safetensors"))
    converted = convert_lora(file.tensors, table, file.metadata, file.adapter_config)
    assert max_difference(merged(base_state, converted), expected_weights(base_state, lora.dense_deltas())) < 1e-6

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(ValueError, match="broken.safetensors.*not a readable safetensors"):
        read_lora_file(str(broken))
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"")
    with pytest.raises(ValueError, match="only .safetensors"):
        read_lora_file(str(pickled))
