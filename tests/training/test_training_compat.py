"""A LoRA trained by FluxWorks Train LoRA (in-process ComfyUI, CPU, fp32, tiny random FLUX.1-dev file) loads
everywhere Flux LoRAs are loaded: diffusers' `load_lora_weights` takes every tensor (zero unmatched keys) and gives
the output of the pack's LoRA stack (FluxWorks Apply LoRA Stack fed by the node's LORA_STACK output), and core's
LoraLoaderModelOnly on the core MODEL of the same file (FluxWorks Load Core Model) gives that output too.

Trained with alpha = rank (the node's default 16/16): the script's layout keeps alpha only in the file's
`lora_adapter_metadata`, which core's LoraLoader does not read (it reads `.alpha` keys), so core applies a file
with alpha != rank at scale 1 instead of alpha / rank (measured: 4.9e-2 / 7.5e-2 relative error at alpha = 2 rank);
the node warns when that happens."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from devtools.tiny_models import random_flux, write_flux
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_training.trainer import flow_prediction
from tests.lora.conftest import pack  # noqa: F401 - the shared in-process host
from tests.nodes.test_core_model_loader import _denoised, _diffusers_x0, _inputs, _rel
from tests.training.test_training_nodes import TRAIN_DEFAULTS, build, encoders  # noqa: F401 - fixtures

GUIDANCE = 3.5


@pytest.fixture(scope="module", params=["attention_mlp", "all"])
def trained(pack, encoders, tmp_path_factory, request):  # noqa: F811
    """The tiny FLUX.1-dev file, its FLUX_MODEL, and what the Train LoRA node returned for 3 steps on it."""
    import folder_paths

    root = tmp_path_factory.mktemp("compat_models")
    path = write_flux(str(root / "compat-tiny-dev.safetensors"), random_flux("dev", seed=4), "bfl")
    folder_paths.add_model_folder_path("diffusion_models", str(root))
    (model,) = pack.nodes.loaders.FluxWorksModelLoader().load(os.path.basename(path), "default")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 64, 80, 3, generator=g)  # not square: the packing order matters
    dataset = build(pack, encoders, folder="", images=images, captions="a red square\na blue circle\na star",
                    resolution=0)
    out = pack.nodes.training.FluxWorksTrainLora().train(
        model, dataset, **{**TRAIN_DEFAULTS, "lora_name": "compat_test", "steps": 3, "learning_rate": 1e-2,
                           "lora_layers": request.param, "alpha": 4.0, "seed": 2})
    return path, model, out["result"]


def test_outputs(trained):
    _, _, (stack, curve, lora_path) = trained
    assert stack == [("compat_test.safetensors", 1.0, 1.0)]
    assert curve.shape == (1, 256, 512, 3) and curve.dtype == torch.float32 and 0 <= curve.min() <= curve.max() <= 1
    assert os.path.isfile(lora_path) and lora_path.endswith("compat_test.safetensors")


def _our_stack_transformer(pack, model, stack):  # noqa: F811
    """The transformer as FluxWorks Sampler runs it after FluxWorks Apply LoRA Stack (weights merged on load)."""
    out = pack.nodes.lora.FluxWorksApplyLoraStack().apply(model, stack)
    patched, _, record = out["result"]
    assert '"unmatched": []' in record
    pack.nodes.host.load_on_device(patched)
    return patched.model.transformer


def _inputs_for_prediction(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 8, 10, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 7, 64, generator=g),
            torch.randn(2, 64, generator=g))


def test_diffusers_load_lora_weights_takes_every_key_and_matches_our_stack(pack, trained):  # noqa: F811
    path, model, (stack, _, lora_path) = trained
    transformer, _, _ = load_flux_transformer(path, "fp32", torch.float32)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    state = FluxPipeline.lora_state_dict(lora_path)
    pipe.load_lora_weights(lora_path, adapter_name="trained")
    loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    assert len(loaded) == len(state)  # zero unmatched keys: every tensor of the file became an adapter tensor
    x, sigma, text, pooled = _inputs_for_prediction()
    with torch.no_grad():
        theirs = flow_prediction(pipe.transformer, x, sigma, text, pooled, GUIDANCE)
        ours = flow_prediction(_our_stack_transformer(pack, model, stack), x, sigma, text, pooled, GUIDANCE)
        base = flow_prediction(load_flux_transformer(path, "fp32", torch.float32)[0], x, sigma, text, pooled,
                               GUIDANCE)
    assert _rel(ours, base) > 1e-3  # the LoRA changes the output
    rel = _rel(ours, theirs)  # measured 2.1e-7 / 2.6e-7 (attention_mlp / all; fp32, CPU)
    assert rel <= 8e-7, f"our LoRA stack vs diffusers load_lora_weights: relative error {rel:.2e}"


def test_core_lora_loader_takes_every_key_and_matches_our_stack(pack, trained):  # noqa: F811
    import comfy.lora
    from safetensors.torch import load_file

    import nodes

    path, model, (stack, _, lora_path) = trained
    (core,) = pack.nodes.loaders.FluxWorksCoreModelLoader().load(os.path.basename(path), "default")
    lora = load_file(lora_path)
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(core.model, {}), log_missing=False)
    assert {k for patch in loaded.values() for k in patch.loaded_keys} == set(lora)  # zero unmatched keys
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(core, "compat_test.safetensors", 1.0)
    ours = copy.deepcopy(_our_stack_transformer(pack, model, stack))
    _, config, compute = load_flux_transformer(path, "fp32", torch.float32)
    inputs = _inputs(64, 64, seed=3)
    reference = _diffusers_x0(ours, config, compute, inputs)
    with torch.no_grad():
        patched.patch_model()
        try:
            got = _denoised(patched, inputs)
        finally:
            patched.unpatch_model()
    assert _rel(got, _denoised(core, inputs)) > 1e-3  # the LoRA does something
    rel = _rel(got, reference)  # measured 9.1e-8 / 9.4e-8 (attention_mlp / all; fp32, CPU)
    assert rel <= 3e-7, f"core LoraLoader on the core MODEL vs our LoRA stack: relative error {rel:.2e}"
