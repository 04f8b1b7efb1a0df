"""Fixtures for the LoRA tests: tiny models, and the pack imported inside an in-process ComfyUI host (CPU)."""

from __future__ import annotations

import pytest
import torch

from devtools.tiny_models import random_flux, random_text_encoders
from tests.paths import comfyui_path


@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """The FluxWorks package (`fluxworks.nodes.lora`, `fluxworks.nodes.host`, ...) with ComfyUI importable,
    ComfyUI on the CPU, and a temporary `loras` folder (returned as `pack.loras_dir`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(comfyui_path())
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import folder_paths

        import fluxworks.nodes.host
        import fluxworks.nodes.lora

        loras = tmp_path_factory.mktemp("loras")
        folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
        import fluxworks

        fluxworks.loras_dir = str(loras)
        yield fluxworks


@pytest.fixture(scope="session")
def flux():
    """Tiny FLUX.1-dev transformer (fp32, random)."""
    return random_flux("dev", 0)


@pytest.fixture(scope="session")
def text_encoders():
    return random_text_encoders(0)


@pytest.fixture
def base_state(flux):
    return {k: v.clone() for k, v in flux.state_dict().items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())
