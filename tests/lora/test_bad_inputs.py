"""Bad LoRA inputs (issue 15, items 3 and 5): non-finite or absurd strengths and non-standard JSON constants are
refused by row and value, LoRA files holding NaN/Inf are refused by file and key, and a file that matches nothing
gets the right diagnosis whether or not a text encoder is connected (pure torch, plus the nodes in-process)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from devtools.tiny_loras import lora_state, random_lora, sdxl_lora, write_lora
from fluxworks.flux_lora import LoraMismatchError, RouteTable, convert_lora, linear_shapes, read_lora_file
from fluxworks.flux_lora.stack import MAX_STRENGTH, check_stack, parse_rows
from tests.lora.lora_helpers import make_patcher


@pytest.fixture(scope="module")
def tables(flux, text_encoders):
    t5, clip = text_encoders
    transformer = linear_shapes(flux, "transformer.")
    return {"with_text": RouteTable.build(transformer, {**linear_shapes(clip, "clip."), **linear_shapes(t5, "t5.")}),
            "model_only": RouteTable.build(transformer)}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_rows_json_refuses_non_standard_constants(literal):
    with pytest.raises(ValueError) as error:
        parse_rows(f'[{{"lora": "a.safetensors", "strength": {literal}}}]')
    message = str(error.value)
    assert f"rows holds {literal}, which is not a number in JSON" in message
    assert f"FluxWorks accepts -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}" in message


@pytest.mark.parametrize("field, literal", [("strength", "1e30"), ("strength", "1e400"), ("text_strength", "-100.5"),
                                            ("strength", "1" + "0" * 400), ("text_strength", "1e30")])
def test_rows_refuse_absurd_strengths_by_row_file_and_value(field, literal):
    """`literal` is the JSON text: 1e400 parses to inf, a 401-digit integer overflows a float."""
    rows = ('[{"lora": "ok.safetensors", "strength": 0.5}, '
            f'{{"lora": "big.safetensors", "enabled": false, "{field}": {literal}}}]')  # refused even when off
    with pytest.raises(ValueError) as error:
        parse_rows(rows)
    message = str(error.value)
    assert message.startswith(f"row 1 (big.safetensors): {field} is ")
    assert "usually between -2 and 2" in message


def test_the_edges_of_the_range_are_accepted():
    rows = [{"lora": "a.safetensors", "strength": MAX_STRENGTH, "text_strength": -MAX_STRENGTH}]
    assert parse_rows(json.dumps(rows)) == [("a.safetensors", MAX_STRENGTH, -MAX_STRENGTH)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30, "0.5"])
def test_a_lora_stack_from_another_pack_is_checked_too(bad):
    with pytest.raises(ValueError, match=r"lora_stack entry 1 \(b\.safetensors\): text_strength"):
        check_stack([("a.safetensors", 1.0, 1.0), ("b.safetensors", 0.5, bad)])
    assert check_stack([("None", 1.0, 1.0), ("a.safetensors", 1, 0.5)]) == [("a.safetensors", 1.0, 0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_lora_file_with_non_finite_values_names_the_file_and_the_first_bad_key(tmp_path, flux, dtype, bad):
    if dtype == torch.float8_e4m3fn and math.isinf(bad):
        bad = math.nan  # e4m3fn has no infinity: casting one gives NaN
    state, metadata = lora_state(random_lora(flux, seed=41, layers="attention_mlp"), "kohya")
    keys = sorted(k for k in state if k.endswith(".weight"))
    poisoned = {k: (v.to(dtype) if k.endswith(".weight") else v) for k, v in state.items()}
    target = poisoned[keys[3]].clone()
    target.view(-1)[5] = torch.tensor(bad).to(dtype)
    poisoned[keys[3]] = target
    path = str(tmp_path / "diverged.safetensors")
    save_file(poisoned, path, metadata=metadata)
    with pytest.raises(ValueError) as error:
        read_lora_file(path)
    assert str(error.value).startswith(f"{path} holds NaN or infinite values in 1 of its {len(state)} tensors, "
                                       f"first '{keys[3]}'")
    clean = str(tmp_path / "clean.safetensors")
    save_file({k: (v.to(dtype) if k.endswith(".weight") else v) for k, v in state.items()}, clean, metadata=metadata)
    assert len(read_lora_file(clean).tensors) == len(state)


def test_a_file_without_lora_keys_is_not_called_a_text_encoder_lora(tables):
    """The bug: no layers and no text layers made "0 == 0", so the message said "connect a FLUX_TEXT_ENCODER"
    even with one connected."""
    checkpoint = {"model.diffusion_model.img_in.weight": torch.zeros(4, 4), "first_stage_model.scale": torch.ones(1)}
    for table in tables.values():
        with pytest.raises(LoraMismatchError) as error:
            convert_lora(checkpoint, table, source="flux1-dev.safetensors")
        message = str(error.value)
        assert message.startswith("flux1-dev.safetensors holds no LoRA tensors")
        assert "FLUX_TEXT_ENCODER" not in message and "model.diffusion_model.img_in.weight" in message


def test_a_text_only_lora_is_diagnosed_by_whether_a_text_encoder_is_connected(tables, text_encoders):
    state = {"lora_te1_text_model_encoder_layers_5_mlp_fc1.lora_down.weight": torch.zeros(4, 64),
             "lora_te1_text_model_encoder_layers_5_mlp_fc1.lora_up.weight": torch.zeros(128, 4)}  # a deeper CLIP
    with pytest.raises(LoraMismatchError, match="only changes the text encoders: connect a FLUX_TEXT_ENCODER"):
        convert_lora(state, tables["model_only"], source="te.safetensors")
    with pytest.raises(LoraMismatchError) as connected:
        convert_lora(state, tables["with_text"], source="te.safetensors")
    message = str(connected.value)
    assert "connect a FLUX_TEXT_ENCODER" not in message
    assert "'lora_te1_text_model_encoder_layers_5_mlp_fc1'" in message and "made for other text encoders" in message


def test_sdxl_lora_still_says_sdxl(tables):
    for table in tables.values():
        with pytest.raises(LoraMismatchError, match="SDXL"):
            convert_lora(sdxl_lora(), table, source="sdxl.safetensors")


def test_the_nodes_refuse_bad_strengths_and_broken_files(pack, flux):
    node = pack.nodes.lora
    assert "rows holds NaN" in node.FluxWorksLoraStack.VALIDATE_INPUTS('[{"lora": "x.safetensors", "strength": NaN}]')
    with pytest.raises(ValueError, match=r"lora_stack entry 0 \(x\.safetensors\): strength is nan"):
        node.FluxWorksApplyLoraStack().apply(make_patcher(pack, flux), [("x.safetensors", math.nan, 1.0)])
    state, metadata = lora_state(random_lora(flux, seed=42, layers="attention_mlp"), "kohya")
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], math.inf)
    name = "node_diverged.safetensors"
    write_lora(os.path.join(pack.loras_dir, name), state, metadata)
    with pytest.raises(ValueError, match=rf"{name} holds NaN or infinite values .* first '{key}'"):
        node.FluxWorksApplyLoraStack().apply(make_patcher(pack, flux), [(name, 1.0, 1.0)])
