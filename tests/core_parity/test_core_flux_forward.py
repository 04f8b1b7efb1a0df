"""Our FLUX.1 loading agrees with ComfyUI core's reading of the same files: one transformer forward each.

Core runs in a child process (ComfyUI's modules expect to own their process and its arguments); tensors travel
through safetensors files. Core's Flux takes unpacked (B, 16, H, W) latents and the raw sigma and guidance
(comfy/ldm/flux/model.py), which is what our FluxDenoiser hands diffusers after packing.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.tiny_models import random_flux, write_flux
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.sampling import FluxDenoiser, TextConditioning
from tests.paths import PYTHON, comfyui_path

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_flux_forward.py")
SIGMA, GUIDANCE = 0.7, 4.0
# (case, variant, file format, our weight_dtype)
CASES = [
    ("dev-bfl", "dev", "bfl", "default"),
    ("dev-bfl_prefixed", "dev", "bfl_prefixed", "default"),
    ("dev-diffusers", "dev", "diffusers", "default"),
    ("schnell-bfl", "schnell", "bfl", "default"),
    ("dev-fp8", "dev", "fp8", "default"),  # fp8 matrices and bf16 vectors: both sides must keep the file's values
]


def _core_file(path: str) -> str:
    """Core reads one safetensors file: a diffusers folder's weights file."""
    return os.path.join(path, "diffusion_pytorch_model.safetensors") if os.path.isdir(path) else path


@pytest.fixture(scope="module")
def forwards(tmp_path_factory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """case -> (our velocity, core's velocity) on the same fixed random inputs."""
    root = tmp_path_factory.mktemp("core_parity")
    models = {"dev": random_flux("dev", seed=0), "schnell": random_flux("schnell", seed=1)}
    paths = {case: write_flux(str(root / f"{case}.safetensors" if fmt != "diffusers" else root / case),
                              models[variant], fmt)
             for case, variant, fmt, _ in CASES}
    generator = torch.Generator().manual_seed(0)
    batch, height, width, tokens = 2, 8, 12, 7  # non-square latent: rows and columns must not be swapped
    dims = models["dev"].config
    inputs = {
        "x": torch.randn(batch, 16, height, width, generator=generator),
        "timestep": torch.full((batch,), SIGMA),
        "guidance": torch.full((batch,), GUIDANCE),
        "context": torch.randn(batch, tokens, dims.joint_attention_dim, generator=generator),
        "y": torch.randn(batch, dims.pooled_projection_dim, generator=generator),
    }
    inputs_path, outputs_path = str(root / "inputs.safetensors"), str(root / "outputs.safetensors")
    save_file(inputs, inputs_path)
    env = {**os.environ, "PYTHONPATH": comfyui_path()}
    log_path = root / "core.log"
    results = {}
    with open(log_path, "w", encoding="utf-8") as log:  # core works in its own process while ours runs here
        child = subprocess.Popen([PYTHON, CHILD, inputs_path, outputs_path, *(_core_file(paths[c[0]]) for c in CASES)],
                                 cwd=comfyui_path(), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for case, _, _, weight_dtype in CASES:
                transformer, config, compute = load_flux_transformer(paths[case], weight_dtype, torch.float32)
                cond = TextConditioning(inputs["context"], inputs["y"])
                denoiser = FluxDenoiser(transformer, cond, None, GuidanceCurve.constant(GUIDANCE), 1,
                                        config.guidance_embeds, compute)
                with torch.no_grad():
                    results[case] = denoiser.model_velocity(inputs["x"], torch.tensor(SIGMA), cond, GUIDANCE)
            child.wait(timeout=300)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, log_path.read_text()[-6000:]
    core = load_file(outputs_path)
    return {case: (ours, core[str(index)]) for index, (case, ours) in enumerate(results.items())}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_forward_matches_core(forwards, case):
    ours, core = forwards[case]
    assert ours.shape == core.shape == (2, 16, 8, 12)
    assert core.std() > 0.1  # a forward that does something
    rel = float((ours - core).norm() / core.norm())
    assert rel <= 1e-4, f"{case}: relative error {rel:.2e} against ComfyUI core"
