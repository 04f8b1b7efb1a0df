"""Text-encoder files (issue 15, items 2, 6, 8): what a file holds is read from its header (cached per version of
the file), both CLIP key layouts load, the CLIP head count comes from where the file states it (or is assumed
with a warning), and a wrong file or a broken prompt gets an error naming it and the fix."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from devtools.tiny_models import random_text_encoders, write_text_encoders
from fluxworks.flux_models import files
from fluxworks.flux_models.text_encoders import (
    CLIP_HEADS_KEY,
    CLIP_L,
    T5,
    check_text,
    clip_heads,
    encode,
    file_text_encoder_kinds,
    load_clip_l,
    load_t5,
    text_encoder_kinds,
)

# A CLIP text tower whose heads are not 64 wide (4 x 32): the count cannot be read from the weights.
NARROW_HEADS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=49408, max_position_embeddings=77)
IDS = torch.tensor([[49406, 320, 736, 2138, 49407] + [49407] * 72])  # "a red circle", padded to 77
# Measured 2026-12-01 (CPU, fp32): the loaded towers' pooled outputs equal the saved model's exactly (relative
# error 0.0: same weights, same config); 1e-6 only allows a different summation order. The narrow tower built with
# 2 heads instead of its 4 differs by a relative 0.26.
EXACT = 1e-6


@pytest.fixture(scope="module")
def encoders():
    return random_text_encoders(0)


@pytest.fixture(scope="module")
def written(tmp_path_factory, encoders):
    t5, clip = encoders
    t5_path, clip_path = write_text_encoders(str(tmp_path_factory.mktemp("te")), t5, clip)
    return t5_path, clip_path


def narrow_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    model = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                         pad_token_id=49407, **NARROW_HEADS)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # beyond init: every head's share of the attention matters
    return model


def pooled(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).pooler_output


def comfy_layout(model) -> dict[str, torch.Tensor]:
    """ComfyUI's clip_l.safetensors layout: `text_model.*` plus a top-level text_projection."""
    state = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous()
             for k, v in model.state_dict().items()}
    state["text_projection.weight"] = torch.eye(model.config.hidden_size)
    return state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_kinds_are_read_from_the_keys(written):
    t5_path, clip_path = written
    assert file_text_encoder_kinds(t5_path) == {T5}
    assert file_text_encoder_kinds(clip_path) == {CLIP_L}
    assert text_encoder_kinds(["embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight"]) \
        == {CLIP_L}  # transformers 5 layout
    merged = ["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
              "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
              "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert text_encoder_kinds(merged) == {T5, CLIP_L}
    assert text_encoder_kinds(["double_blocks.0.img_attn.qkv.weight", "img_in.weight"]) == frozenset()


def test_other_and_unreadable_files_are_left_out_and_logged_once(tmp_path, caplog):
    vae = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(vae))
    broken = tmp_path / "t5xxl_half.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    pickle = tmp_path / "t5xxl.bin"
    pickle.write_bytes(b"\x80\x04")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert file_text_encoder_kinds(str(vae)) == frozenset()
            assert file_text_encoder_kinds(str(broken)) == frozenset()
            assert file_text_encoder_kinds(str(pickle)) == frozenset()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert any("ae.safetensors" in m and "looks like a VAE" in m for m in lines)
    assert any("t5xxl_half.safetensors" in m and "not a readable safetensors file" in m for m in lines)
    assert any("t5xxl.bin" in m and "only .safetensors" in m for m in lines)


def test_the_header_is_read_again_when_the_file_changes(tmp_path, written):
    t5_path, clip_path = written
    path = str(tmp_path / "text_encoder.safetensors")
    shutil.copyfile(t5_path, path)
    assert file_text_encoder_kinds(path) == {T5}
    shutil.copyfile(clip_path, path)
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1_000_000_000))
    assert file_text_encoder_kinds(path) == {CLIP_L}
    assert files.read_header(path).keys == files.read_header(clip_path).keys


def test_both_clip_key_layouts_load_to_the_same_model(tmp_path, encoders):
    _, clip = encoders
    comfy = comfy_layout(clip)
    flat = {k.removeprefix("text_model."): v for k, v in comfy.items() if k.startswith("text_model.")}  # transformers 5
    save_file(comfy, str(tmp_path / "clip_l.safetensors"))
    save_file(flat, str(tmp_path / "clip_l_t5layout.safetensors"))
    reference = pooled(clip)
    for name in ("clip_l.safetensors", "clip_l_t5layout.safetensors"):
        assert file_text_encoder_kinds(str(tmp_path / name)) == {CLIP_L}
        assert rel(pooled(load_clip_l(str(tmp_path / name), torch.float32)), reference) < EXACT, name


def test_clip_head_count_comes_from_the_config_beside_the_file(tmp_path):
    model = narrow_clip()
    folder = tmp_path / "clip_narrow"
    model.save_pretrained(str(folder))  # model.safetensors (transformers 5 keys) + config.json
    loaded = load_clip_l(str(folder / "model.safetensors"), torch.float32)
    assert loaded.config.num_attention_heads == 4
    assert rel(pooled(loaded), pooled(model)) < EXACT


def test_clip_head_count_comes_from_the_metadata(tmp_path):
    model = narrow_clip()
    path = str(tmp_path / "clip_narrow.safetensors")
    save_file(comfy_layout(model), path, metadata={CLIP_HEADS_KEY: "4"})
    loaded = load_clip_l(path, torch.float32)
    assert loaded.config.num_attention_heads == 4
    assert rel(pooled(loaded), pooled(model)) < EXACT


def test_an_unstated_head_count_is_assumed_64_wide_with_a_warning(tmp_path, caplog):
    model = narrow_clip()
    path = str(tmp_path / "clip_narrow.safetensors")
    save_file(comfy_layout(model), path)
    with caplog.at_level(logging.WARNING):
        loaded = load_clip_l(path, torch.float32)
    assert loaded.config.num_attention_heads == 2
    [warning] = [r.getMessage() for r in caplog.records if "head" in r.getMessage()]
    assert path in warning and "assuming 2 attention head(s) of width 64" in warning and "config.json" in warning
    assert rel(pooled(loaded), pooled(model)) > 0.05  # what the warning is about: the outputs are wrong


def test_released_widths_need_no_statement_and_bad_statements_are_refused(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert clip_heads(768, "clip_l.safetensors", None) == 12
        assert clip_heads(1280, "clip_g.safetensors", None) == 20
    assert not caplog.records
    with pytest.raises(ValueError, match=r"x\.safetensors: a CLIP text tower 96 wide .* config\.json"):
        clip_heads(96, "x.safetensors", None)
    with pytest.raises(ValueError, match=r"num_attention_heads 5, which does not divide the width 128"):
        clip_heads(128, "x.safetensors", ({"num_attention_heads": 5}, "config.json"))
    with pytest.raises(ValueError, match=r"hidden_size 768, but the weights are 128 wide"):
        clip_heads(128, "x.safetensors", ({"num_attention_heads": 4, "hidden_size": 768}, "config.json"))
    path = str(tmp_path / "clip.safetensors")
    save_file(comfy_layout(narrow_clip()), path, metadata={CLIP_HEADS_KEY: "four"})
    with pytest.raises(ValueError, match=rf"{CLIP_HEADS_KEY}='four' is not a whole number"):
        load_clip_l(path, torch.float32)


def test_a_clip_file_given_as_t5_and_the_reverse_name_the_file_and_the_fix(written):
    t5_path, clip_path = written
    with pytest.raises(ValueError) as t5_error:
        load_t5(clip_path, None, torch.float32)
    assert clip_path in str(t5_error.value) and "looks like a CLIP text encoder" in str(t5_error.value)
    assert "as t5_name" in str(t5_error.value)
    with pytest.raises(ValueError) as clip_error:
        load_clip_l(t5_path, torch.float32)
    assert t5_path in str(clip_error.value) and "looks like a T5 text encoder" in str(clip_error.value)
    assert "as clip_name" in str(clip_error.value)


def test_a_clip_file_of_wrong_shapes_names_the_file(tmp_path, encoders):
    _, clip = encoders
    state = comfy_layout(clip)
    state["text_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    path = str(tmp_path / "clip_l_damaged.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"(?s)clip_l_damaged\.safetensors: weights do not fit .*fc1"):
        load_clip_l(path, torch.float32)


@pytest.mark.parametrize("field", ["prompt", "clip_prompt"])
def test_a_lone_surrogate_is_refused_with_its_position(field):
    text = "a red circle \ud83d on blue"
    with pytest.raises(ValueError) as error:
        check_text(field, text)
    message = str(error.value)
    assert message.startswith(f"{field} holds a lone UTF-16 surrogate U+D83D at character 13")
    assert "'a red circle '" in message and "delete it" in message
    check_text(field, "a red circle \U0001F600 on blue")  # the whole emoji is fine
    prompts = {"prompt": text, "clip_prompt": None} if field == "prompt" else {"prompt": "ok", "clip_prompt": text}
    with pytest.raises(ValueError, match=f"{field} holds a lone UTF-16 surrogate"):
        encode(None, None, None, prompts["prompt"], prompts["clip_prompt"], 128, torch.device("cpu"))
