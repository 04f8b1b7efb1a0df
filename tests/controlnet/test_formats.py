"""Every Flux ControlNet format loads with its architecture read from the weights, its residuals match
ComfyUI core's ControlNetFlux for the same file, and files that are not Flux ControlNets are refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.tiny_controlnets import random_controlnet, write_controlnet
from devtools.tiny_models import random_flux, write_flux, write_vae
from fluxworks.flux_controlnet import block_indices, detect_format, load_controlnet, pixel_cond
from fluxworks.flux_sampler.latents import make_img_ids, pack
from tests.parity.conftest import rel_err
from tests.paths import comfyui_path

FILES = {  # name: (kind, file format, blocks, union mode)
    "instantx": ("instantx", "diffusers", {"num_layers": 2, "num_single_layers": 3}, None),
    "union": ("union", "diffusers", {"num_layers": 2, "num_single_layers": 0}, 4),
    "xlabs": ("xlabs", "xlabs", {"num_layers": 2, "num_single_layers": 0}, None),
    "mistoline": ("mistoline", "mistoline", {"num_layers": 2, "num_single_layers": 2}, None),
}
CORE_DOUBLE, CORE_SINGLE = 19, 38  # ComfyUI's ControlNetFlux always answers for FLUX.1's full depth


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    paths = {}
    for seed, (name, (kind, fmt, blocks, _)) in enumerate(FILES.items()):
        paths[name] = write_controlnet(str(folder / f"{name}.safetensors"), random_controlnet(kind, seed, **blocks), fmt)
    return paths


@pytest.mark.parametrize("name", list(FILES))
def test_format_and_architecture_are_read_from_the_weights(written, name):
    kind, _, blocks, _ = FILES[name]
    assert detect_format(load_file(written[name])) == kind
    net = load_controlnet(written[name], "default", torch.float32)
    assert (net.config.kind, net.config.num_layers, net.config.num_single_layers) == (
        kind, blocks["num_layers"], blocks["num_single_layers"])
    assert net.config.inner_dim == 256 and net.config.joint_attention_dim == 64
    assert net.config.latent_input == (kind in ("instantx", "union"))
    assert net.config.num_mode == (10 if kind == "union" else None)


def test_residuals_equal_comfyui_core_for_every_format(written, tmp_path):
    torch.manual_seed(3)
    x, context, y = torch.randn(1, 16, 16, 16), torch.randn(1, 12, 64), torch.randn(1, 64)
    image = torch.rand(1, 128, 128, 3)
    latent_hint = torch.randn(1, 16, 16, 16)
    timesteps, guidance = torch.tensor([0.6]), torch.tensor([3.5])
    inputs_path, out_path = str(tmp_path / "inputs.safetensors"), str(tmp_path / "core.safetensors")
    save_file({"x": x, "context": context, "y": y, "image_hint": image.movedim(-1, 1).contiguous(),
               "latent_hint": latent_hint, "timesteps": timesteps, "guidance": guidance}, inputs_path)
    specs = [f"{n}={written[n]}:{FILES[n][0]}" + (f":{FILES[n][3]}" if FILES[n][3] is not None else "") for n in FILES]
    script = os.path.join(os.path.dirname(__file__), "comfy_reference.py")
    env = {**os.environ, "PYTHONPATH": comfyui_path()}
    done = subprocess.run([sys.executable, script, inputs_path, out_path, *specs], env=env, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    core = load_file(out_path)

    ours_inputs = {"hidden_states": pack(x), "encoder_hidden_states": context, "pooled_projections": y,
                   "timestep": timesteps, "txt_ids": torch.zeros(12, 3), "img_ids": make_img_ids(16, 16, "cpu", torch.float32)}
    for name, (_, _, _, mode) in FILES.items():
        net = load_controlnet(written[name], "default", torch.float32)
        cond = pack(latent_hint) if net.config.latent_input else pixel_cond(image)
        with torch.no_grad():
            double, single = net.residuals(ours_inputs, cond, mode, 1.0, 3.5)
        for kind, samples, depth in (("input", double, CORE_DOUBLE), ("output", single, CORE_SINGLE)):
            if not samples:
                assert f"{name}.{kind}.0" not in core
                continue
            for block, index in enumerate(block_indices(depth, len(samples), net.cyclic)):
                assert rel_err(samples[index], core[f"{name}.{kind}.{block}"]) <= 1e-4, (name, kind, block)


def test_a_flux_transformer_is_refused_with_what_was_expected(tmp_path):
    path = write_flux(str(tmp_path / "flux1-dev.safetensors"), random_flux("dev", 0))
    with pytest.raises(ValueError, match="flux1-dev.safetensors is not a Flux ControlNet") as err:
        load_controlnet(path, "default", torch.float32)
    message = str(err.value)
    assert "controlnet_x_embedder.weight" in message and "XLabs" in message and "MistoLine" in message
    assert "FluxWorksModelLoader" in message  # what the file is and where it goes instead


def test_a_vae_is_refused_with_a_hint(tmp_path):
    path = write_vae(str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match="is not a Flux ControlNet") as err:
        load_controlnet(path, "default", torch.float32)
    assert "first keys" in str(err.value) or "VAE" in str(err.value)


def test_a_union_net_needs_a_mode_and_a_plain_net_refuses_one(written):
    inputs = {"hidden_states": torch.zeros(1, 64, 64), "encoder_hidden_states": torch.zeros(1, 4, 64),
              "pooled_projections": torch.zeros(1, 64), "timestep": torch.tensor([0.5]), "txt_ids": torch.zeros(4, 3),
              "img_ids": make_img_ids(16, 16, "cpu", torch.float32)}
    union = load_controlnet(written["union"], "default", torch.float32)
    with pytest.raises(ValueError, match="Union ControlNet: choose a union mode"):
        union.residuals(inputs, torch.zeros(1, 64, 64), None, 1.0, 3.5)
    plain = load_controlnet(written["instantx"], "default", torch.float32)
    with pytest.raises(ValueError, match="not a Union ControlNet"):
        plain.residuals(inputs, torch.zeros(1, 64, 64), 2, 1.0, 3.5)


def test_block_layouts_follow_diffusers_and_comfyui():
    assert block_indices(19, 5, cyclic=False) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3
    assert block_indices(38, 10, cyclic=False) == [i // 4 for i in range(38)]
    assert block_indices(19, 2, cyclic=True) == [0, 1] * 9 + [0]
