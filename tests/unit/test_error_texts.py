"""Damaged weight files and mismatched batches (issue 15, item 6): the error names the file, the key and the fix,
instead of torch's `split_with_sizes` / `size mismatch` text or a self-contradicting hint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.tiny_controlnets import random_controlnet, write_controlnet
from devtools.tiny_models import random_flux, write_flux
from fluxworks.flux_controlnet.model import check_batch, load_controlnet
from fluxworks.flux_models.transformer import load_flux_transformer


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory) -> str:
    return write_flux(str(tmp_path_factory.mktemp("flux") / "flux1-dev-tiny.safetensors"), random_flux("dev", 0))


def damaged(bfl_file: str, tmp_path, name: str, change) -> str:
    state = load_file(bfl_file)
    change(state)
    path = str(tmp_path / name)
    save_file(state, path)
    return path


@pytest.mark.parametrize("key, rows, what", [
    ("double_blocks.0.img_attn.qkv.weight", 700, "a fused q/k/v needs 768 rows (256 + 256 + 256)"),
    ("single_blocks.1.linear1.bias", 1000, "a fused q/k/v + MLP input needs 1792 rows (256 + 256 + 256 + 1024)"),
])
def test_a_wrong_fused_shape_names_the_file_the_key_and_the_sizes(bfl_file, tmp_path, key, rows, what):
    def cut(state):
        state[key] = state[key][:rows].clone()

    path = damaged(bfl_file, tmp_path, "flux1-dev-cut.safetensors", cut)
    with pytest.raises(ValueError) as error:
        load_flux_transformer(path, "default", torch.float32)
    message = str(error.value)
    assert message.startswith(f"{path}: '{key}' has shape ({rows},") and what in message
    assert "split_with_sizes" not in message


def test_a_missing_key_names_the_file(bfl_file, tmp_path):
    path = damaged(bfl_file, tmp_path, "flux1-dev-no-txt-in.safetensors", lambda s: s.pop("txt_in.weight"))
    with pytest.raises(ValueError, match=rf"^{path}: FLUX.1 weights are missing the key 'context_embedder.weight'"):
        load_flux_transformer(path, "default", torch.float32)


def test_a_wrong_shape_names_the_file_and_the_key(bfl_file, tmp_path):
    def widen(state):
        state["double_blocks.0.img_mlp.2.weight"] = torch.zeros(256, 1000)

    path = damaged(bfl_file, tmp_path, "flux1-dev-wide-mlp.safetensors", widen)
    with pytest.raises(ValueError, match=rf"(?s)^{path}: weights do not fit .*transformer_blocks\.0\.ff\.net\.2"):
        load_flux_transformer(path, "default", torch.float32)


def test_controlnet_errors_name_the_file(tmp_path):
    path = write_controlnet(str(tmp_path / "cn.safetensors"), random_controlnet("instantx", 0), "diffusers")
    state = load_file(path)
    missing = str(tmp_path / "cn-missing.safetensors")
    save_file({k: v for k, v in state.items() if k != "context_embedder.weight"}, missing)
    with pytest.raises(ValueError, match=rf"^{missing}: Flux ControlNet weights are missing the key"):
        load_controlnet(missing, "default", torch.float32)
    wrong = str(tmp_path / "cn-wrong-shape.safetensors")
    save_file({**state, "controlnet_blocks.0.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=rf"(?s)^{wrong}: instantx ControlNet weights do not fit .*controlnet_blocks"):
        load_controlnet(wrong, "default", torch.float32)
    xlabs = write_controlnet(str(tmp_path / "xlabs.safetensors"), random_controlnet("xlabs", 0), "xlabs")
    cut = str(tmp_path / "xlabs-cut.safetensors")
    xstate = load_file(xlabs)
    save_file({**xstate, "double_blocks.0.txt_attn.qkv.weight": xstate["double_blocks.0.txt_attn.qkv.weight"][:5]}, cut)
    with pytest.raises(ValueError, match=rf"^{cut}: 'double_blocks.0.txt_attn.qkv.weight' has shape \(5,"):
        load_controlnet(cut, "default", torch.float32)


def test_batch_mismatch_messages_offer_fixes_that_exist():
    with pytest.raises(ValueError) as one:
        check_batch(3, 1, "the control image of canny.safetensors")
    assert str(one.value) == ("the control image of canny.safetensors is a batch of 3 but the latent batch is 1: "
                              "give just one, or set the latent batch_size to 3")
    with pytest.raises(ValueError) as two:
        check_batch(3, 2, "the control mask")
    assert "give one (it serves every latent) or 2, or set the latent batch_size to 3" in str(two.value)
    for images, latents in ((1, 4), (4, 4), (1, 1)):
        check_batch(images, latents, "the control image")
