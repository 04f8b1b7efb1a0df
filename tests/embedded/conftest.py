"""Fixtures for the embedded model's tests (the ComfyUI server fixture is in tests/conftest.py) and the model
loaded once through flux_models for all tests here."""

import pytest

from evaluation.embedded import EmbeddedPipeline
from tests.paths import tokenizer_folders


@pytest.fixture(scope="session")
def embedded_pipeline() -> EmbeddedPipeline:
    return EmbeddedPipeline.load(tokenizer_folders())
