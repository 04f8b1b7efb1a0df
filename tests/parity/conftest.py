"""Shared reference objects for parity tests: diffusers FluxPipelines around tiny random models."""

from __future__ import annotations

import pytest
import torch

from devtools.tiny_models import random_flux, random_text_encoders
from fluxworks.flux_models.text_encoders import Tokenizers
from tests.paths import tokenizer_folders


def flux_scheduler(variant: str):
    """The scheduler configs shipped with black-forest-labs/FLUX.1-dev and FLUX.1-schnell."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if variant == "dev":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


@pytest.fixture(scope="session")
def tokenizers() -> Tokenizers:
    return Tokenizers.from_folders(*tokenizer_folders())


@pytest.fixture(scope="session")
def text_encoders():
    return random_text_encoders(0)


@pytest.fixture(scope="session")
def transformers_by_variant():
    return {"dev": random_flux("dev", 0), "schnell": random_flux("schnell", 1)}


def make_pipeline(transformer, variant: str, text_encoders=None, tokenizers: Tokenizers | None = None):
    from diffusers import FluxPipeline

    t5, clip = text_encoders if text_encoders else (None, None)
    pipe = FluxPipeline(
        scheduler=flux_scheduler(variant), vae=None, transformer=transformer,
        text_encoder=clip, tokenizer=tokenizers.clip if tokenizers else None,
        text_encoder_2=t5, tokenizer_2=tokenizers.t5 if tokenizers else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
