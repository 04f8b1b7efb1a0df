"""FluxWorks LoRA Dataset and FluxWorks Train LoRA in an in-process ComfyUI on the CPU: every bad input is refused
with a message naming the file or value and the fix, before anything is trained (no LoRA file appears), and the
nodes' choices follow what is installed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.tiny_models import random_flux
from tests.lora.conftest import pack  # noqa: F401 - the shared in-process host
from tests.lora.lora_helpers import make_patcher

EMBEDDED_T5, EMBEDDED_CLIP = "t5xxl_shapes_tiny.safetensors", "clip_l_shapes_tiny.safetensors"
EMBEDDED_VAE = "taef1_shapes_tiny.safetensors"


@pytest.fixture(scope="module")
def encoders(pack):  # noqa: F811
    """(FLUX_TEXT_ENCODER, core VAE) of the embedded model: 64-wide T5 and CLIP-L, as the tiny random FLUX.1 reads."""
    import nodes

    (te,) = pack.nodes.loaders.FluxWorksTextEncoderLoader().load(EMBEDDED_T5, EMBEDDED_CLIP, "default")
    (vae,) = nodes.VAELoader().load_vae(EMBEDDED_VAE)
    return te, vae


@pytest.fixture
def input_dir(pack, tmp_path):  # noqa: F811
    """ComfyUI's input folder set to a fresh folder for the test."""
    import folder_paths

    before = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(before)


def picture(path, size=(64, 64), colour=(200, 30, 30)) -> None:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = (20, 40, 200)
    pixels[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = colour
    Image.fromarray(pixels).save(path)


def build(pack, encoders, folder="data", **overrides):  # noqa: F811
    te, vae = encoders
    args = dict(folder=folder, instance_prompt="", resolution=64, caption_dropout=0.0, max_sequence_length="128")
    args.update(overrides)
    return pack.nodes.training.FluxWorksLoraDataset().build(te, vae, **args)["result"][0]


TRAIN_DEFAULTS = dict(lora_name="bad_input_test", steps=2, rank=4, alpha=4.0, learning_rate=1e-3,
                      lr_schedule="constant", lr_warmup_steps=0, optimizer="adamw", batch_size=1,
                      gradient_accumulation=1, gradient_checkpointing=False, fp8_base=False,
                      timestep_sampling="flux_shift", guidance=1.0, lora_layers="attention", seed=0, save_every=0)


def train(pack, model, dataset, **overrides):  # noqa: F811
    return pack.nodes.training.FluxWorksTrainLora().train(model, dataset, **{**TRAIN_DEFAULTS, **overrides})


def test_empty_folder_is_refused(pack, encoders, input_dir):  # noqa: F811
    (input_dir / "data").mkdir()
    with pytest.raises(ValueError) as error:
        build(pack, encoders)
    assert "holds no pictures" in str(error.value) and str(input_dir / "data") in str(error.value)
    assert "name.png + name.txt" in str(error.value)


def test_missing_folder_empty_name_and_escape_are_refused(pack, encoders, input_dir):  # noqa: F811
    with pytest.raises(ValueError, match="does not exist: create it under ComfyUI's input folder"):
        build(pack, encoders, folder="nowhere")
    with pytest.raises(ValueError, match="folder is empty and no images are connected"):
        build(pack, encoders, folder="  ")
    with pytest.raises(ValueError, match="is outside ComfyUI's input folder"):
        build(pack, encoders, folder="../..")


def test_picture_without_caption_is_refused_unless_an_instance_prompt_stands_in(pack, encoders, input_dir):  # noqa: F811
    data = input_dir / "data"
    data.mkdir()
    picture(data / "a.png")
    (data / "a.txt").write_text("a red square")
    picture(data / "b.png")
    with pytest.raises(ValueError) as error:
        build(pack, encoders)
    assert "1 pictures in" in str(error.value) and "b.png" in str(error.value)
    assert "add name.txt beside each name.png, or set instance_prompt" in str(error.value)
    dataset = build(pack, encoders, instance_prompt="a photo of sks square")
    assert sorted(c for b in dataset.data.buckets for c in b.captions) == ["a photo of sks square", "a red square"]


def test_unreadable_picture_is_refused(pack, encoders, input_dir):  # noqa: F811
    data = input_dir / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a caption")
    with pytest.raises(ValueError) as error:
        build(pack, encoders)
    assert str(data / "broken.png") in str(error.value) and "cannot be read as a picture" in str(error.value)
    assert "replace or remove it" in str(error.value)


def test_size_not_a_multiple_of_16_is_refused_without_buckets(pack, encoders, input_dir):  # noqa: F811
    data = input_dir / "data"
    data.mkdir()
    picture(data / "odd.png", size=(70, 64))
    (data / "odd.txt").write_text("a red square")
    with pytest.raises(ValueError) as error:
        build(pack, encoders, resolution=0)
    assert "odd.png is 70x64" in str(error.value) and "multiples of 16" in str(error.value)
    assert "crop it (e.g. to 64x64) or set resolution" in str(error.value)
    dataset = build(pack, encoders, resolution=64)  # buckets fit it
    assert dataset.data.sizes == [(64, 64)]
    with pytest.raises(ValueError, match="resolution must be 0 .* or a multiple of 16, got 70"):
        build(pack, encoders, resolution=70)


def test_image_batch_needs_one_caption_per_picture(pack, encoders):  # noqa: F811
    images = torch.rand(3, 64, 64, 3)
    with pytest.raises(ValueError, match="the image batch has 3 pictures but captions has 2 non-empty lines"):
        build(pack, encoders, folder="", images=images, captions="one\ntwo")
    dataset = build(pack, encoders, folder="", images=images, captions="one\ntwo\nthree")
    assert len(dataset.data) == 3 and dataset.source == "an IMAGE batch of 3"


@pytest.fixture(scope="module")
def small_dataset(pack, encoders):  # noqa: F811
    return build(pack, encoders, folder="", images=torch.rand(2, 64, 64, 3), captions="a\nb")


def test_too_little_memory_names_the_options_that_lower_it(pack, small_dataset, monkeypatch):  # noqa: F811
    model = make_patcher(pack, random_flux("dev", 0))
    monkeypatch.setattr(pack.nodes.host, "device_total_memory", lambda device: 1024**2)
    loras = pack.nodes.host.lora_output_folder()
    with pytest.raises(MemoryError) as error:
        train(pack, model, small_dataset, lora_name="too_big")
    message = str(error.value)
    assert "training needs about" in message and "GiB are available" in message
    assert "gradient_checkpointing on" in message and "fp8_base on" in message and "batch_size" in message
    with pytest.raises(MemoryError) as error:
        train(pack, model, small_dataset, lora_name="too_big", gradient_checkpointing=True, fp8_base=True)
    assert "gradient_checkpointing on" not in str(error.value) and "fp8_base on" not in str(error.value)
    assert not os.path.exists(os.path.join(loras, "too_big.safetensors"))  # refused before training


def test_bad_settings_are_refused_before_training(pack, small_dataset):  # noqa: F811
    model = make_patcher(pack, random_flux("dev", 0))
    loras = pack.nodes.host.lora_output_folder()
    with pytest.raises(ValueError, match="lora_name 'sub/name' must be a plain file name"):
        train(pack, model, small_dataset, lora_name="sub/name")
    with pytest.raises(ValueError, match="validate_every is 5 but validation_prompt and validation_vae"):
        train(pack, model, small_dataset, validate_every=5)
    with pytest.raises(ValueError, match="lr_schedule 'wavy' is not one of"):
        train(pack, model, small_dataset, lr_schedule="wavy")
    with pytest.raises(TypeError, match="expects a FLUX_LORA_DATASET from FluxWorks LoRA Dataset"):
        train(pack, model, {"not": "a dataset"})
    wide = make_patcher(pack, random_flux("dev", 0, joint_attention_dim=128))
    with pytest.raises(ValueError, match="encoded by text encoders of width 64, but the model reads 128"):
        train(pack, wide, small_dataset)
    assert not os.path.exists(os.path.join(loras, "bad_input_test.safetensors"))


def test_optimiser_choices_follow_bitsandbytes(pack):  # noqa: F811
    import importlib.util

    choices = pack.nodes.training.FluxWorksTrainLora.INPUT_TYPES()["required"]["optimizer"][0]
    assert choices[0] == "adamw"
    assert ("adamw8bit" in choices) == (importlib.util.find_spec("bitsandbytes") is not None)


def test_cancel_saves_a_checkpoint_that_resumes(pack, small_dataset, monkeypatch):  # noqa: F811
    """ComfyUI's Cancel (its interrupt exception from the check the node runs every step) stops the run after a
    step; the file and its state are saved, and resume_lora continues to the full step count."""
    import comfy.model_management as mm

    model = make_patcher(pack, random_flux("dev", 0))
    calls = {"n": 0}

    def interrupt_on_third_check():
        calls["n"] += 1
        if calls["n"] == 3:  # two checks per step: the second step's first check
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(pack.nodes.host, "check_interrupt", interrupt_on_third_check)
    with pytest.raises(mm.InterruptProcessingException):
        train(pack, model, small_dataset, lora_name="cancelled", steps=4)
    path = os.path.join(pack.nodes.host.lora_output_folder(), "cancelled.safetensors")
    assert os.path.isfile(path) and os.path.isfile(path.replace(".safetensors", ".state.safetensors"))
    monkeypatch.setattr(pack.nodes.host, "check_interrupt", lambda: None)
    out = train(pack, model, small_dataset, lora_name="cancelled", steps=4, resume_lora="cancelled.safetensors")
    assert "after 4 steps" in out["ui"]["text"][0]
    assert not any("lora_" in n for n, _ in model.model.transformer.named_parameters())  # the model is left clean
