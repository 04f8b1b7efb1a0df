"""The embedded model's example LoRA and ControlNet: the shipped files fit the embedded transformer as the FluxWorks
loaders read them, and the training scripts that made them still run end to end and write such files (CPU, a
step or two on a few pictures; the shipped files took minutes on a GPU, embedded_model/README.md)."""

from __future__ import annotations

import os

import torch

from devtools.embedded_examples import EMBEDDED_CONTROLNET, EMBEDDED_LORA
from evaluation.embedded import EMBEDDED_DIR
from fluxworks.flux_controlnet import load_controlnet
from fluxworks.flux_lora import RouteTable, convert_lora, linear_shapes, read_lora_file
from tests.paths import tokenizer_folders
from training import train_embedded_controlnet, train_embedded_lora

LORA_PATH = os.path.join(EMBEDDED_DIR, "loras", EMBEDDED_LORA)
CONTROLNET_PATH = os.path.join(EMBEDDED_DIR, "controlnet", EMBEDDED_CONTROLNET)
TOKENIZERS = ["--clip-tokenizer", tokenizer_folders()[0], "--t5-tokenizer", tokenizer_folders()[1], "--device", "cpu"]


def check_lora(path: str, transformer: torch.nn.Module) -> None:
    """Every tensor of the file lands on a layer of the embedded transformer (diffusers/PEFT format, rank 16)."""
    lora = read_lora_file(path)
    table = RouteTable.build(linear_shapes(transformer, "transformer."))
    converted = convert_lora(lora.tensors, table, lora.metadata, lora.adapter_config, source=os.path.basename(path))
    assert converted.unmatched == ()
    assert converted.layers_matched == len(lora.tensors) // 2  # one A and one B per layer, each layer placed
    assert {t.shape[0] for k, t in lora.tensors.items() if "lora_A" in k} == {train_embedded_lora.RANK}


def check_controlnet(path: str, transformer: torch.nn.Module) -> None:
    """An InstantX-style ControlNet of the transformer's width and head layout, with one double block."""
    net = load_controlnet(path, "default", torch.float32)
    config, ours = net.config, transformer.config
    assert (config.kind, config.num_layers, config.num_single_layers) == ("instantx", 1, 0)
    assert (config.num_attention_heads, config.attention_head_dim) == (ours.num_attention_heads,
                                                                       ours.attention_head_dim)
    assert config.guidance_embeds and config.latent_input


def test_shipped_lora_fits_the_embedded_transformer(embedded_pipeline):
    check_lora(LORA_PATH, embedded_pipeline.transformer)


def test_shipped_controlnet_fits_the_embedded_transformer(embedded_pipeline):
    check_controlnet(CONTROLNET_PATH, embedded_pipeline.transformer)


def test_controlnet_training_script_writes_a_loadable_controlnet(tmp_path, embedded_pipeline):
    out = str(tmp_path / "controlnet.safetensors")
    train_embedded_controlnet.main(["--images", "12", "--steps", "2", "--batch", "4", "--out", out, *TOKENIZERS])
    check_controlnet(out, embedded_pipeline.transformer)


def test_lora_training_script_writes_a_lora_the_stack_reads(tmp_path, embedded_pipeline):
    out = str(tmp_path / "lora.safetensors")
    train_embedded_lora.main(["--images", "8", "--steps", "2", "--batch", "4", "--out", out, *TOKENIZERS])
    check_lora(out, embedded_pipeline.transformer)
