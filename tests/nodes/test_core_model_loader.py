"""FluxWorks Load Core Model in an in-process ComfyUI on the CPU (issue 15, defect 1): any FLUX.1 file the pack
reads becomes a core MODEL. On a 3072-wide file (the only width core's UNETLoader builds) its MODEL is core's,
bit for bit, from the BFL and the diffusers layout; on the 2-head embedded model it agrees with our diffusers
forward; core's LoRA loader patches it; wrong files are refused naming the file and the fix."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.tiny_models import random_flux, write_flux
from evaluation.embedded import EMBEDDED_DIR, FILES
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_models.transformer_keys import bfl_to_diffusers
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.sampling import FluxDenoiser, TextConditioning
from tests.e2e.workflows import write_core_width_flux
from tests.lora.conftest import pack  # noqa: F401 - the shared in-process host

SIGMA, GUIDANCE = 0.7, 4.0
EMBEDDED_TRANSFORMER = os.path.join(EMBEDDED_DIR, FILES["transformer"])
EMBEDDED_LORA = os.path.join(EMBEDDED_DIR, "loras", "flux1-shapes-tiny-lora-diamond.safetensors")


@pytest.fixture(scope="module")
def core_width(tmp_path_factory) -> dict[str, str]:
    """The e2e tests' 3072-wide one-block FLUX.1-dev (fp8 matrices) as a BFL file and as a diffusers-layout file,
    both in a diffusion_models folder."""
    root = tmp_path_factory.mktemp("core_width")
    bfl = write_core_width_flux(str(root / "corewidth-bfl.safetensors"))
    diffusers = str(root / "corewidth-diffusers.safetensors")
    save_file({k: v.contiguous() for k, v in bfl_to_diffusers(load_file(bfl)).items()}, diffusers)
    return {"root": str(root), "bfl": bfl, "diffusers": diffusers}


@pytest.fixture
def loaders(pack, core_width):  # noqa: F811
    """(core UNETLoader, FluxWorksCoreModelLoader), with the core-width files listed in diffusion_models."""
    import folder_paths

    import nodes

    folder_paths.add_model_folder_path("diffusion_models", core_width["root"])
    return nodes.UNETLoader(), pack.nodes.loaders.FluxWorksCoreModelLoader()


def _inputs(context_dim: int, pooled_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 16, 8, 12, generator=generator),  # not square: rows and columns stay apart
            "context": torch.randn(2, 7, context_dim, generator=generator),
            "y": torch.randn(2, pooled_dim, generator=generator)}


def _denoised(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Core's denoiser output (BaseModel.apply_model: sigma in, x0 out) at SIGMA with guidance GUIDANCE."""
    batch = inputs["x"].shape[0]
    with torch.no_grad():
        return model.model.apply_model(inputs["x"], torch.full((batch,), SIGMA), c_crossattn=inputs["context"],
                                       y=inputs["y"], guidance=torch.full((batch,), GUIDANCE))


def test_choices_are_core_unet_loaders(pack, loaders):  # noqa: F811
    core, ours = loaders
    assert ours.INPUT_TYPES()["required"]["weight_dtype"][0] == core.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert "flux1-shapes-tiny.safetensors" in ours.INPUT_TYPES()["required"]["model_name"][0]


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_core_width_model_is_core_unet_loaders_bit_for_bit(loaders, core_width, layout):
    core_loader, ours_loader = loaders
    [core] = core_loader.load_unet(os.path.basename(core_width["bfl"]), "default")
    [ours] = ours_loader.load(os.path.basename(core_width[layout]), "default")
    assert ours.model.model_config.unet_config == core.model.model_config.unet_config
    assert type(ours.model.model_config) is type(core.model.model_config)
    assert ours.model.get_dtype() == core.model.get_dtype()
    core_state, our_state = core.model.state_dict(), ours.model.state_dict()
    assert core_state.keys() == our_state.keys()
    assert all(torch.equal(core_state[k], our_state[k]) for k in core_state)
    inputs = _inputs(64, 64)
    expected = _denoised(core, inputs)
    assert expected.std() > 0.1
    assert torch.equal(_denoised(ours, inputs), expected)


def test_fp8_weight_dtype_stores_fp8_as_core_does(loaders, core_width):
    core_loader, ours_loader = loaders
    [core] = core_loader.load_unet(os.path.basename(core_width["bfl"]), "fp8_e4m3fn")
    [ours] = ours_loader.load(os.path.basename(core_width["bfl"]), "fp8_e4m3fn")
    weight = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert ours.model.state_dict()[weight].dtype == torch.float8_e4m3fn
    inputs = _inputs(64, 64, seed=1)
    assert torch.equal(_denoised(ours, inputs), _denoised(core, inputs))


def _diffusers_x0(transformer, config, compute, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our FluxDenoiser's x0 at SIGMA (flow matching: x0 = x - sigma * velocity)."""
    cond = TextConditioning(inputs["context"], inputs["y"])
    denoiser = FluxDenoiser(transformer, cond, None, GuidanceCurve.constant(GUIDANCE), 1, config.guidance_embeds,
                            compute)
    with torch.no_grad():
        return inputs["x"] - SIGMA * denoiser.model_velocity(inputs["x"], torch.tensor(SIGMA), cond, GUIDANCE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_embedded_model_matches_our_diffusers_forward(loaders):
    """The 2-head, 256-wide embedded model: core's FLUX.1 code and our diffusers transformer, one forward each."""
    _, ours_loader = loaders
    [core] = ours_loader.load("flux1-shapes-tiny.safetensors", "default")
    unet = core.model.model_config.unet_config
    assert (unet["num_heads"], unet["hidden_size"], unet["axes_dim"]) == (2, 256, [16, 56, 56])
    inputs = _inputs(64, 64, seed=2)
    reference = _diffusers_x0(*load_flux_transformer(EMBEDDED_TRANSFORMER, "fp32", torch.float32), inputs)
    rel = _rel(_denoised(core, inputs), reference)  # measured 1.3e-6 (fp32, CPU)
    assert rel <= 4e-6, f"core FLUX.1 vs diffusers on the embedded model: relative error {rel:.2e}"


def test_core_lora_loader_on_the_embedded_model_matches_the_merged_lora(loaders, tmp_path):
    """Core's LoraLoaderModelOnly maps every layer of the embedded example LoRA (diffusers keys, q/k/v into core's
    fused 256-row slices: its key map comes from the unet_config this loader writes), and the patched MODEL gives
    the output of our diffusers transformer with W + B @ A merged (the file's lora_alpha = r = 16: scale 1)."""
    import comfy.lora
    import folder_paths

    import nodes

    _, ours_loader = loaders
    [model] = ours_loader.load("flux1-shapes-tiny.safetensors", "default")
    lora = load_file(EMBEDDED_LORA)
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    assert {k for patch in loaded.values() for k in patch.loaded_keys} == set(lora)
    # a copy under another name: the embedded folder itself stays listed only by FluxWorks' loaders
    shutil.copyfile(EMBEDDED_LORA, tmp_path / "core-loader-copy-of-diamond.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    [patched] = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "core-loader-copy-of-diamond.safetensors", 1.0)
    transformer, config, compute = load_flux_transformer(EMBEDDED_TRANSFORMER, "fp32", torch.float32)
    with torch.no_grad():
        for key, down in lora.items():
            if key.endswith(".lora_A.weight"):
                layer = key[len("transformer."): -len(".lora_A.weight")]
                up = lora[key.replace(".lora_A.", ".lora_B.")]
                transformer.get_submodule(layer).weight += up.float() @ down.float()
    inputs = _inputs(64, 64, seed=3)
    reference = _diffusers_x0(transformer, config, compute, inputs)
    with torch.no_grad():
        patched.patch_model()
        try:
            got = _denoised(patched, inputs)
        finally:
            patched.unpatch_model()
    assert _rel(got, _denoised(model, inputs)) > 1e-2  # the LoRA does something
    rel = _rel(got, reference)  # measured 1.5e-6 (fp32, CPU)
    assert rel <= 5e-6, f"core LoRA on our MODEL vs merged diffusers: relative error {rel:.2e}"


@pytest.mark.parametrize("case", ["text_encoder", "truncated", "unknown_layout"])
def test_bad_files_are_refused_naming_the_file_and_the_fix(loaders, tmp_path, case):
    """Through the node, from a diffusion_models folder: a T5 file put there, a download cut in half, and a
    safetensors file of some other architecture."""
    import folder_paths

    _, ours_loader = loaders
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    path = str(tmp_path / f"{case}.safetensors")
    if case == "text_encoder":
        shutil.copyfile(os.path.join(EMBEDDED_DIR, FILES["t5"]), path)
        needles = ("is not a FLUX.1 transformer", "T5 text encoder", "models/text_encoders")
    elif case == "truncated":
        data = open(EMBEDDED_TRANSFORMER, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        needles = ("not a readable safetensors file", "truncated by an interrupted download")
    else:
        save_file({"blocks.0.attn.weight": torch.zeros(4, 4), "head.weight": torch.zeros(4)}, path)
        needles = ("is not a FLUX.1 transformer", "double_blocks.0.img_attn.qkv.weight", "x_embedder.weight",
                   "blocks.0.attn.weight")
    with pytest.raises(ValueError) as error:
        ours_loader.load(os.path.basename(path), "default")
    assert path in str(error.value)
    for needle in needles:
        assert needle in str(error.value)
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        ours_loader.load("flux1-shapes-tiny.safetensors", "bf16")


@pytest.mark.parametrize("variant,fmt", [("dev", "diffusers"), ("dev", "bfl_prefixed"), ("dev", "fp8_scaled"),
                                         ("schnell", "bfl")])
def test_every_file_format_the_pack_reads_gives_the_diffusers_forward(loaders, tmp_path, variant, fmt):
    """The 2-head tiny model as a diffusers folder (save_pretrained), under `model.diffusion_model.`, as ComfyUI's
    scaled fp8 and as schnell: the core MODEL's x0 against our diffusers transformer read from the same file."""
    import folder_paths

    _, ours_loader = loaders
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    name = f"tiny-{variant}-{fmt}" + ("" if fmt == "diffusers" else ".safetensors")
    path = write_flux(str(tmp_path / name), random_flux(variant, seed=4), fmt)
    [core] = ours_loader.load(name, "default")
    assert core.model.model_config.unet_config["num_heads"] == 2
    assert core.model.model_config.unet_config["guidance_embed"] == (variant == "dev")
    inputs = _inputs(64, 64, seed=5)
    transformer, config, compute = load_flux_transformer(path, "fp32", torch.float32)
    if fmt == "fp8_scaled":  # core's scaled-fp8 Linear is built in fp8, its bias included: biases round to fp8
        with torch.no_grad():
            for module in transformer.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.copy_(module.bias.to(torch.float8_e4m3fn).float())
    reference = _diffusers_x0(transformer, config, compute, inputs)
    rel = _rel(_denoised(core, inputs), reference)  # measured 9.1e-8 to 1.3e-7 (fp32, CPU)
    assert rel <= 4e-7, f"{fmt}: core FLUX.1 vs diffusers, relative error {rel:.2e}"
