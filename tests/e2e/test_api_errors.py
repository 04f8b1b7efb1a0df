"""Bad input through the HTTP API: each prompt fails with an error naming the problem, the server stays up,
and the next good prompt succeeds."""

from __future__ import annotations

import itertools
import os
import random
import zlib
from collections.abc import Iterator

import pytest

from devtools.comfy_server import PromptRejected
from tests.e2e.workflows import SAMPLER, text_to_image

pytestmark = pytest.mark.e2e

@pytest.fixture
def seeds(request) -> Iterator[int]:
    """Seeds no other test uses, so ComfyUI's cache never answers for a sampler: it must run."""
    return itertools.count(zlib.crc32(request.node.name.encode()) * 1000)


def _good_prompt_succeeds(server, seeds: Iterator[int]) -> None:
    assert server.alive(), "the server died"
    result = server.run(text_to_image(server.model_names, seed=next(seeds), steps=1))
    assert result.status == "success", [m for m in result.messages if m["type"] == "execution_error"]
    assert result.progress(SAMPLER) == [1], "the sampler did not run"


def _error_message(server, prompt: dict) -> str:
    """The execution_error message of `prompt` (which must fail while executing, not at validation)."""
    result = server.run(prompt)
    assert result.status == "error", f"expected an execution_error, got {result.status}"
    return result.error()["exception_message"]


def _prompt(server, seeds: Iterator[int], **overrides) -> dict:
    return text_to_image(server.model_names, seed=next(seeds), steps=overrides.pop("steps", 1), **overrides)


@pytest.fixture
def diffusion_model_file(comfy_server):
    """Returns a function placing a file in models/diffusion_models; removes the files after the test."""
    written = []

    def place(name: str, content: bytes) -> str:
        path = os.path.join(comfy_server.models_dir, "diffusion_models", name)
        with open(path, "wb") as f:
            f.write(content)
        written.append(path)
        return name

    yield place
    for path in written:
        os.remove(path)


def _with_model(server, seeds: Iterator[int], model_name: str) -> dict:
    prompt = _prompt(server, seeds)
    prompt["model"]["inputs"]["model_name"] = model_name
    return prompt


def test_missing_model_file(comfy_server, seeds):
    name = "flux1-dev-not-downloaded.safetensors"
    try:
        message = _error_message(comfy_server, _with_model(comfy_server, seeds, name))
    except PromptRejected as rejected:  # ComfyUI's validation: the value is not in the loader's list
        assert rejected.status == 400
        message = str(rejected.body)
    assert name in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_truncated_safetensors_file(comfy_server, seeds, diffusion_model_file):
    with open(os.path.join(comfy_server.models_dir, "diffusion_models", comfy_server.model_names["dev"]), "rb") as f:
        content = f.read()
    name = diffusion_model_file("flux1-dev-half-downloaded.safetensors", content[: len(content) // 2])
    message = _error_message(comfy_server, _with_model(comfy_server, seeds, name))
    assert name in message and "truncated" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_corrupt_safetensors_file(comfy_server, seeds, diffusion_model_file):
    name = diffusion_model_file("flux1-dev-corrupt.safetensors", random.Random(0).randbytes(64 * 1024))
    message = _error_message(comfy_server, _with_model(comfy_server, seeds, name))
    assert name in message and "not a readable safetensors file" in message
    _good_prompt_succeeds(comfy_server, seeds)


@pytest.mark.parametrize("role, folder, looks_like", [
    ("t5", "text_encoders", "T5 text encoder"),
    ("clip_l", "text_encoders", "CLIP text encoder"),
    ("vae", "vae", "VAE"),
])
def test_non_flux_file_given_to_the_model_loader(comfy_server, seeds, diffusion_model_file, role, folder, looks_like):
    source = os.path.join(comfy_server.models_dir, folder, comfy_server.model_names[role])
    with open(source, "rb") as f:
        name = diffusion_model_file(f"misplaced-{role}.safetensors", f.read())
    message = _error_message(comfy_server, _with_model(comfy_server, seeds, name))
    assert name in message and "not a FLUX.1 transformer" in message
    assert f"looks like a {looks_like}" in message or f"looks like a tiny {looks_like}" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_size_not_a_multiple_of_16(comfy_server, seeds):
    message = _error_message(comfy_server, _prompt(comfy_server, seeds, width=72, height=64))
    assert "72x64" in message and "multiple of 16" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_zero_steps(comfy_server, seeds):
    message = _error_message(comfy_server, _prompt(comfy_server, seeds, steps=0))
    assert "steps must be at least 1" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_empty_prompt_is_allowed(comfy_server, seeds):
    result = comfy_server.run(_prompt(comfy_server, seeds, text=""))
    assert result.status == "success", [m for m in result.messages if m["type"] == "execution_error"]
    assert comfy_server.images(result)


def test_ten_thousand_word_prompt_is_truncated_with_a_warning(comfy_server, seeds):
    warning = "prompt truncated to 256 T5 tokens"
    before = comfy_server.log().count(warning)
    words = " ".join(random.Random(1).choice(["red", "fox", "snowy", "forest", "dawn"]) for _ in range(10_000))
    result = comfy_server.run(_prompt(comfy_server, seeds, text=words))
    assert result.status == "success", [m for m in result.messages if m["type"] == "execution_error"]
    assert comfy_server.log().count(warning) == before + 1
    _good_prompt_succeeds(comfy_server, seeds)


def test_interrupt_mid_sampling(comfy_server, seeds):
    interrupted_at: list[int] = []

    def interrupt_on_first_step(server, message: dict) -> None:
        if message["type"] == "progress" and message["data"]["node"] == SAMPLER and not interrupted_at:
            server.interrupt()
            interrupted_at.append(len(received))

    received: list[dict] = []

    def on_message(server, message: dict) -> None:
        received.append(message)
        interrupt_on_first_step(server, message)

    # 256x256 and 200 steps: a minute of sampling on a CPU unless the interrupt stops it
    result = comfy_server.run(_prompt(comfy_server, seeds, width=256, height=256, steps=200), timeout=120,
                              on_message=on_message)
    assert result.status == "interrupted"
    assert interrupted_at, "the sampler never reported progress"
    late = [m for m in received[interrupted_at[0]:] if m["type"] == "progress" and m["data"]["node"] == SAMPLER]
    assert len(late) <= 1, f"{len(late)} progress messages after the interrupt"
    _good_prompt_succeeds(comfy_server, seeds)
