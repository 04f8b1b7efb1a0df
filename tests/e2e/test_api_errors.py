"""Bad input through the HTTP API: each prompt fails with an error naming the problem, the server stays up,
and the next good prompt succeeds."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save, save_file

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
    """The sampler's steps widget has min 1, so ComfyUI's validation refuses 0 before anything runs."""
    message = _rejected(comfy_server, _prompt(comfy_server, seeds, steps=0))
    assert "Value 0 smaller than min of 1" in message and '"steps"' in message
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


# --- issue 15: file pickers, non-finite numbers, errors that name things -----------------------------------

EMBEDDED_ONLY = {  # FluxWorks-only files of the embedded model: (core node, input) lists that must not show them
    "flux1-shapes-tiny.safetensors": [("UNETLoader", "unet_name")],
    "t5xxl_shapes_tiny.safetensors": [("CLIPLoader", "clip_name"), ("DualCLIPLoader", "clip_name1")],
    "clip_l_shapes_tiny.safetensors": [("CLIPLoader", "clip_name"), ("DualCLIPLoader", "clip_name2")],
    "flux1-shapes-tiny-lora-diamond.safetensors": [("LoraLoader", "lora_name"), ("LoraLoaderModelOnly", "lora_name")],
    "flux1-shapes-tiny-controlnet-canny.safetensors": [("ControlNetLoader", "control_net_name")],
}


def _choices(info: dict, node: str, name: str) -> list[str]:
    """A combo input's options, in either object_info spelling ([options, {...}] or ["COMBO", {"options"}])."""
    spec = info[node]["input"]["required"][name]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def _rejected(server, prompt: dict) -> str:
    """The validation error text of a prompt the server refuses before running anything."""
    with pytest.raises(PromptRejected) as rejected:
        server.queue(prompt, "issue15")
    assert rejected.value.status == 400
    return json.dumps(rejected.value.body)


def test_text_encoder_pickers_list_only_their_kind_and_refuse_swapped_files(comfy_server, seeds):
    info = comfy_server.get_json("/object_info")
    names = comfy_server.model_names
    t5_names = _choices(info, "FluxWorksTextEncoderLoader", "t5_name")
    clip_names = _choices(info, "FluxWorksTextEncoderLoader", "clip_name")
    assert names["t5"] in t5_names and names["clip_l"] not in t5_names
    assert names["clip_l"] in clip_names and names["t5"] not in clip_names
    assert t5_names[0].startswith("t5xxl") and clip_names[0].startswith("clip_l")  # the defaults work
    assert names["vae"] not in t5_names + clip_names
    prompt = _prompt(comfy_server, seeds)
    prompt["text_encoder"]["inputs"].update(t5_name=names["clip_l"], clip_name=names["t5"])
    message = _rejected(comfy_server, prompt)
    assert f"t5_name '{names['clip_l']}' is a CLIP-L text encoder" in message and "choose it as clip_name" in message
    assert f"clip_name '{names['t5']}' is a T5-XXL text encoder" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_a_clip_saved_by_transformers_5_loads_and_gives_the_same_image(comfy_server, seeds):
    from devtools.tiny_models import random_text_encoders

    _, clip = random_text_encoders(0)  # the weights of the server's clip_l file, saved without `text_model.`
    folder = os.path.join(comfy_server.models_dir, "text_encoders", "clip_l_transformers5")
    clip.save_pretrained(folder)
    name = "clip_l_transformers5/model.safetensors"
    try:
        seed = next(seeds)
        reference = comfy_server.run(_prompt(comfy_server, iter([seed])))
        prompt = _prompt(comfy_server, iter([seed]))
        prompt["text_encoder"]["inputs"]["clip_name"] = name
        result = comfy_server.run(prompt)
        assert result.status == reference.status == "success", result.messages[-3:]
        [a], [b] = comfy_server.images(reference), comfy_server.images(result)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    finally:
        shutil.rmtree(folder)


def test_embedded_files_are_listed_only_where_they_load(comfy_server):
    info = comfy_server.get_json("/object_info")
    for name, core_lists in EMBEDDED_ONLY.items():
        for node, field in core_lists:
            assert name not in _choices(info, node, field), (name, node)
    assert "taef1_shapes_tiny.safetensors" in _choices(info, "VAELoader", "vae_name")  # core decodes with it
    ours = {("FluxWorksModelLoader", "model_name"): "flux1-shapes-tiny.safetensors",
            ("FluxWorksTextEncoderLoader", "t5_name"): "t5xxl_shapes_tiny.safetensors",
            ("FluxWorksTextEncoderLoader", "clip_name"): "clip_l_shapes_tiny.safetensors",
            ("FluxWorksControlNetLoader", "control_net_name"): "flux1-shapes-tiny-controlnet-canny.safetensors"}
    for (node, field), name in ours.items():
        assert name in _choices(info, node, field), (node, name)
    loras = comfy_server.get_json("/models/loras") + comfy_server.get_json("/models/fluxworks_loras")
    assert "flux1-shapes-tiny-lora-diamond.safetensors" in loras  # what the LoRA stack widget lists


def _lora_prompt(server, seeds: Iterator[int], rows: list[dict] | str) -> dict:
    prompt = _prompt(server, seeds)
    prompt["stack"] = {"class_type": "FluxWorksLoraStack",
                       "inputs": {"rows": rows if isinstance(rows, str) else json.dumps(rows)}}
    prompt["apply"] = {"class_type": "FluxWorksApplyLoraStack",
                       "inputs": {"flux_model": ["model", 0], "lora_stack": ["stack", 0],
                                  "text_encoder": ["text_encoder", 0]}}
    prompt[SAMPLER]["inputs"]["model"] = ["apply", 0]
    prompt["encode"]["inputs"]["text_encoder"] = ["apply", 1]
    return prompt


@pytest.fixture
def lora_file(comfy_server):
    """Returns a function writing a LoRA state into models/loras; removes the files after the test."""
    written = []

    def place(name: str, state: dict) -> str:
        path = os.path.join(comfy_server.models_dir, "loras", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(state, path)
        written.append(path)
        return name

    yield place
    for path in written:
        os.remove(path)


def _tiny_lora(seed: int) -> dict:
    from devtools.tiny_loras import lora_state, random_lora
    from devtools.tiny_models import random_flux

    state, _ = lora_state(random_lora(random_flux("dev", 0), seed=seed, layers="attention_mlp"), "kohya")
    return state


@pytest.mark.parametrize("rows, named", [
    ('[{"lora": "e2e_nan.safetensors", "strength": NaN}]', "rows holds NaN"),
    ('[{"lora": "e2e_nan.safetensors", "strength": Infinity}]', "rows holds Infinity"),
    ('[{"lora": "e2e_nan.safetensors", "strength": 1e30}]', "row 0 (e2e_nan.safetensors): strength is 1e+30"),
    ('[{"lora": "e2e_nan.safetensors", "strength": 0.5, "text_strength": -1e9}]',
     "row 0 (e2e_nan.safetensors): text_strength is -1000000000.0"),
])
def test_non_finite_or_absurd_lora_strengths_are_refused(comfy_server, seeds, lora_file, rows, named):
    lora_file("e2e_nan.safetensors", _tiny_lora(51))
    message = _rejected(comfy_server, _lora_prompt(comfy_server, seeds, rows))
    assert named in message and "FluxWorks accepts -100 to 100" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_a_lora_file_holding_nan_names_the_file_and_the_key(comfy_server, seeds, lora_file):
    state = _tiny_lora(52)
    key = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
    state[key] = state[key].clone()
    state[key][0, 0] = math.nan
    name = lora_file("e2e_diverged.safetensors", state)
    message = _error_message(comfy_server, _lora_prompt(comfy_server, seeds, [{"lora": name, "strength": 0.8}]))
    assert name in message and "NaN or infinite values" in message and f"first '{key}'" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_a_file_without_lora_keys_is_diagnosed_as_such_with_a_text_encoder_connected(comfy_server, seeds, lora_file):
    name = lora_file("e2e_not_a_lora.safetensors", {"model.diffusion_model.img_in.weight": torch.zeros(4, 4)})
    message = _error_message(comfy_server, _lora_prompt(comfy_server, seeds, [{"lora": name}]))
    assert f"{name} holds no LoRA tensors" in message and "FLUX_TEXT_ENCODER" not in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_a_lone_surrogate_in_the_prompt_is_named(comfy_server, seeds):
    message = _error_message(comfy_server, _prompt(comfy_server, seeds, text="a red circle \ud83d on blue"))
    assert "prompt holds a lone UTF-16 surrogate U+D83D at character 13" in message and "delete it" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_a_wrong_fused_shape_names_the_file_and_the_key(comfy_server, seeds, diffusion_model_file):
    state = load_file(os.path.join(comfy_server.models_dir, "diffusion_models", comfy_server.model_names["dev"]))
    key = "double_blocks.0.txt_attn.qkv.weight"
    state[key] = state[key][:700].clone()
    name = diffusion_model_file("flux1-dev-damaged.safetensors", save(state))
    message = _error_message(comfy_server, _with_model(comfy_server, seeds, name))
    assert name in message and f"'{key}' has shape (700, " in message and "split_with_sizes" not in message
    _good_prompt_succeeds(comfy_server, seeds)


@pytest.fixture(scope="module")
def pixel_controlnet(comfy_server) -> str:
    """A tiny XLabs ControlNet (reads pixels: no VAE needed) for the server's tiny dev model."""
    from devtools.tiny_controlnets import random_controlnet, write_controlnet

    name = "e2e-errors-xlabs.safetensors"
    write_controlnet(os.path.join(comfy_server.models_dir, "controlnet", name),
                     random_controlnet("xlabs", 0, num_single_layers=0), "xlabs")
    return name


def _controlled(server, seeds: Iterator[int], controlnet: str, images: int, **apply) -> dict:
    prompt = _prompt(server, seeds)
    prompt["cn"] = {"class_type": "FluxWorksControlNetLoader",
                    "inputs": {"control_net_name": controlnet, "weight_dtype": "default"}}
    prompt["control_image"] = {"class_type": "EmptyImage",
                               "inputs": {"width": 64, "height": 64, "batch_size": images, "color": 0xFFFFFF}}
    prompt["apply"] = {"class_type": "FluxWorksControlNetApply", "inputs": {
        "conditioning": ["encode", 0], "control_net": ["cn", 0], "image": ["control_image", 0], "strength": 0.7,
        "start_percent": 0.0, "end_percent": 1.0, "union_mode": "none", **apply}}
    prompt[SAMPLER]["inputs"]["positive"] = ["apply", 0]
    return prompt


def test_a_control_image_batch_that_does_not_fit_says_what_does(comfy_server, seeds, pixel_controlnet):
    message = _error_message(comfy_server, _controlled(comfy_server, seeds, pixel_controlnet, images=3))
    assert message.strip() == (f"the control image of {pixel_controlnet} is a batch of 3 but the latent batch is 1: give "
                       "just one, or set the latent batch_size to 3")
    result = comfy_server.run(_controlled(comfy_server, seeds, pixel_controlnet, images=1))
    assert result.status == "success", result.messages[-3:]


@pytest.mark.parametrize("field", ["strength", "end_percent"])
def test_a_non_finite_controlnet_setting_is_refused_by_name(comfy_server, seeds, pixel_controlnet, field):
    message = _error_message(comfy_server, _controlled(comfy_server, seeds, pixel_controlnet, images=1,
                                                       **{field: math.nan}))
    assert f"FluxWorksControlNetApply: {field} is nan; it must be a finite number" in message
    _good_prompt_succeeds(comfy_server, seeds)


def test_an_impossible_size_is_refused_before_sampling(comfy_server, seeds):
    """16384x16384 (the largest size EmptySD3LatentImage allows): the sampler refuses it with its memory estimate
    and the fix before any transformer call, instead of growing the server until it is killed."""
    started = time.monotonic()
    message = _error_message(comfy_server, _prompt(comfy_server, seeds, width=16384, height=16384))
    assert "16384x16384 at batch 1" in message and "GiB" in message and "lower width/height" in message, message
    assert time.monotonic() - started < 60  # refused up front, not after minutes of sampling
    _good_prompt_succeeds(comfy_server, seeds)
