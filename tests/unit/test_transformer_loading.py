import os

import pytest
import torch
from safetensors.torch import save_file

from devtools.tiny_models import random_flux, random_text_encoders, write_flux, write_text_encoders, write_vae
from fluxworks.flux_models.transformer import load_flux_transformer


@pytest.fixture(scope="module")
def dev_model():
    return random_flux("dev", 0)


@pytest.mark.parametrize("fmt", ["bfl", "bfl_prefixed", "diffusers"])
def test_every_layout_loads_the_same_weights(tmp_path, dev_model, fmt):
    path = write_flux(str(tmp_path / ("m" if fmt == "diffusers" else "m.safetensors")), dev_model, fmt)
    model, config, compute = load_flux_transformer(path, "default", torch.float32)
    assert config.variant == "dev" and compute == torch.float32
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads) == (1, 2, 2)
    ref = dev_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_schnell_is_recognised_by_its_missing_guidance_embedder(tmp_path):
    path = write_flux(str(tmp_path / "s.safetensors"), random_flux("schnell", 1))
    _, config, _ = load_flux_transformer(path, "default", torch.float32)
    assert config.variant == "schnell" and not config.guidance_embeds


def test_widths_other_than_3072_are_inferred(tmp_path):
    wide = random_flux("dev", 2, num_attention_heads=3, num_layers=2, num_single_layers=1)
    path = write_flux(str(tmp_path / "w.safetensors"), wide)
    _, config, _ = load_flux_transformer(path, "default", torch.float32)
    assert config.num_attention_heads * config.attention_head_dim == 384
    assert (config.num_layers, config.num_single_layers) == (2, 1)


def test_fp8_file_stays_fp8_by_default_and_matches_its_dequantised_weights(tmp_path, dev_model):
    path = write_flux(str(tmp_path / "f.safetensors"), dev_model, "fp8")
    model, _, compute = load_flux_transformer(path, "default", torch.float32)
    q = model.transformer_blocks[0].attn.to_q.weight
    assert q.dtype == torch.float8_e4m3fn and compute == torch.float32
    assert model.transformer_blocks[0].attn.to_q.bias.dtype == torch.float32  # biases stay wide
    ref = dev_model.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(q.float(), ref.to(torch.float8_e4m3fn).float())


def test_scaled_fp8_is_dequantised(tmp_path, dev_model):
    path = write_flux(str(tmp_path / "fs.safetensors"), dev_model, "fp8_scaled")
    model, _, _ = load_flux_transformer(path, "default", torch.float32)
    ref = dev_model.transformer_blocks[0].attn.to_q.weight
    got = model.transformer_blocks[0].attn.to_q.weight
    assert got.dtype == torch.float32
    assert (got - ref).norm() / ref.norm() < 0.05


def test_explicit_fp8_storage_on_a_full_precision_file(tmp_path, dev_model):
    path = write_flux(str(tmp_path / "m.safetensors"), dev_model)
    model, _, compute = load_flux_transformer(path, "fp8_e5m2", torch.float32)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e5m2 and compute == torch.float32


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_flux_transformer(str(tmp_path / "nope.safetensors"), "default", torch.float32)


def test_truncated_file_is_reported_as_such(tmp_path, dev_model):
    path = write_flux(str(tmp_path / "t.safetensors"), dev_model)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_flux_transformer(path, "default", torch.float32)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_flux_transformer(str(path), "default", torch.float32)


@pytest.mark.parametrize("kind,expected", [("vae", "VAE"), ("t5", "T5 text encoder"), ("clip", "CLIP text encoder"),
                                           ("other", "first keys")])
def test_non_flux_files_say_what_they_look_like(tmp_path, kind, expected):
    if kind == "vae":
        path = write_vae(str(tmp_path / "v.safetensors"))
    elif kind in ("t5", "clip"):
        t5_path, clip_path = write_text_encoders(str(tmp_path), *random_text_encoders(0))
        path = t5_path if kind == "t5" else clip_path
    else:
        path = str(tmp_path / "o.safetensors")
        save_file({"some.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError) as err:
        load_flux_transformer(path, "default", torch.float32)
    assert "is not a FLUX.1 transformer" in str(err.value) and expected in str(err.value)
    assert os.path.basename(path) in str(err.value)
