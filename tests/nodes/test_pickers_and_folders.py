"""Model lists and inputs at the node boundary, in an in-process ComfyUI on the CPU (issue 15, items 2, 3, 6, 11):
each text-encoder picker lists only files of its kind; the embedded model's files are listed by FluxWorks
loaders but not in the standard folders core's loaders read (its VAE excepted); the depth key is FluxWorks' own
with an extension filter; ControlNet settings and batches are checked before sampling."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from devtools.tiny_controlnets import random_controlnet, write_controlnet
from devtools.tiny_models import random_text_encoders, write_text_encoders
from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures

EMBEDDED = {"diffusion_models": "flux1-shapes-tiny.safetensors", "text_encoders": "t5xxl_shapes_tiny.safetensors",
            "loras": "flux1-shapes-tiny-lora-diamond.safetensors",
            "controlnet": "flux1-shapes-tiny-controlnet-canny.safetensors"}
EMBEDDED_VAE = "taef1_shapes_tiny.safetensors"


@pytest.fixture
def folder_paths(pack):  # noqa: F811
    import folder_paths

    return folder_paths


@pytest.fixture
def text_encoder_dir(folder_paths, tmp_path):
    """A text_encoders root holding a T5, a CLIP-L saved by transformers 5, a VAE, a truncated file and a pickle;
    removed from the folder list afterwards."""
    t5, clip = random_text_encoders(0)
    t5_path, clip_path = write_text_encoders(str(tmp_path), t5, clip)
    os.rename(t5_path, tmp_path / "t5xxl_fp16_test.safetensors")
    clip.save_pretrained(str(tmp_path / "clip_hf"))  # clip_hf/model.safetensors without `text_model.`
    os.remove(clip_path)
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "ae_in_wrong_folder.safetensors"))
    (tmp_path / "clip_l_half.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    (tmp_path / "t5xxl_old.bin").write_bytes(b"\x80\x04")
    paths = folder_paths.folder_names_and_paths["text_encoders"][0]
    paths.insert(0, str(tmp_path))
    yield tmp_path
    paths.remove(str(tmp_path))


def test_each_text_encoder_picker_lists_only_its_kind(pack, text_encoder_dir):  # noqa: F811
    loader = pack.nodes.loaders.FluxWorksTextEncoderLoader
    required = loader.INPUT_TYPES()["required"]
    t5_names, clip_names = required["t5_name"][0], required["clip_name"][0]
    assert t5_names[0] == "t5xxl_fp16_test.safetensors" and EMBEDDED["text_encoders"] in t5_names
    assert clip_names[0] == "clip_hf/model.safetensors" and "clip_l_shapes_tiny.safetensors" in clip_names
    assert not set(t5_names) & set(clip_names)
    everything = set(t5_names) | set(clip_names)
    assert not everything & {"ae_in_wrong_folder.safetensors", "clip_l_half.safetensors", "t5xxl_old.bin"}
    assert loader.VALIDATE_INPUTS(t5_names[0], clip_names[0]) is True


def test_files_of_flux_sizes_come_first(pack, folder_paths, tmp_path):  # noqa: F811
    """A folder that also holds SDXL's CLIP-G (sorted before clip_l) and a T5 of another width: the defaults are
    still CLIP-L and T5-XXL. Only the widths matter here (read from the header), so the vocabularies are cut."""
    layer = "encoder.layers.0.self_attn.q_proj.weight"
    t5_layer = "encoder.block.0.layer.0.SelfAttention.q.weight"
    for name, state in (
        ("clip_g.safetensors", {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 1280),
                                "text_model." + layer: torch.zeros(1, 1)}),
        ("clip_l.safetensors", {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 768),
                                "text_model." + layer: torch.zeros(1, 1)}),
        ("t5_base.safetensors", {"shared.weight": torch.zeros(4, 768), t5_layer: torch.zeros(1, 1)}),
        ("t5xxl_fp16.safetensors", {"shared.weight": torch.zeros(4, 4096), t5_layer: torch.zeros(1, 1)}),
    ):
        save_file(state, str(tmp_path / name))
    paths = folder_paths.folder_names_and_paths["text_encoders"][0]
    paths.insert(0, str(tmp_path))
    try:
        required = pack.nodes.loaders.FluxWorksTextEncoderLoader.INPUT_TYPES()["required"]
    finally:
        paths.remove(str(tmp_path))
    assert required["clip_name"][0][:2] == ["clip_l.safetensors", "clip_g.safetensors"]
    assert required["t5_name"][0][:2] == ["t5xxl_fp16.safetensors", "t5_base.safetensors"]
    assert required["t5_name"][0][-1] == EMBEDDED["text_encoders"]  # the user's files before the embedded one


def test_swapped_or_unlisted_text_encoders_are_refused_with_the_fix(pack, text_encoder_dir):  # noqa: F811
    validate = pack.nodes.loaders.FluxWorksTextEncoderLoader.VALIDATE_INPUTS
    swapped = validate("clip_hf/model.safetensors", "t5xxl_fp16_test.safetensors")
    assert ("t5_name 'clip_hf/model.safetensors' is a CLIP-L text encoder (clip_l.safetensors), not a T5-XXL text "
            "encoder (t5xxl_*.safetensors): choose it as clip_name, and one of these as t5_name: "
            "t5xxl_fp16_test.safetensors") in swapped
    assert "clip_name 't5xxl_fp16_test.safetensors' is a T5-XXL text encoder" in swapped
    unlisted = validate("ae_in_wrong_folder.safetensors", "clip_hf/model.safetensors")
    assert unlisted.startswith("t5_name 'ae_in_wrong_folder.safetensors' is not a T5-XXL text encoder "
                               "(t5xxl_*.safetensors) in models/text_encoders") and "the server log says which" in unlisted
    assert unlisted.endswith("choose one of: t5xxl_fp16_test.safetensors, t5xxl_shapes_tiny.safetensors")


def test_the_loader_loads_the_transformers_5_clip(pack, text_encoder_dir):  # noqa: F811
    (holder,) = pack.nodes.loaders.FluxWorksTextEncoderLoader().load("t5xxl_fp16_test.safetensors",
                                                                     "clip_hf/model.safetensors", "default")
    _, clip = random_text_encoders(0)
    ids = torch.tensor([[49406, 320, 736, 49407] + [49407] * 73])
    with torch.no_grad():
        expected, got = clip(ids).pooler_output, holder.model.clip(ids).pooler_output
    assert torch.equal(got, expected)


def test_embedded_files_are_listed_only_by_fluxworks_loaders(pack, folder_paths):  # noqa: F811
    host = pack.nodes.host
    for kind, name in EMBEDDED.items():
        assert name in host.filename_list(kind), kind
        assert name not in folder_paths.get_filename_list(kind), kind  # what core's and other packs' loaders list
        assert os.path.isfile(host.full_path(kind, name))
    assert EMBEDDED_VAE in folder_paths.get_filename_list("vae")  # core's VAELoader loads it
    assert EMBEDDED["diffusion_models"] in pack.nodes.loaders.FluxWorksModelLoader.INPUT_TYPES()["required"][
        "model_name"][0]
    listed = pack.nodes.controlnet.FluxWorksControlNetLoader.INPUT_TYPES()["required"]["control_net_name"][0]
    assert EMBEDDED["controlnet"] in listed
    assert pack.nodes.lora.missing_loras([EMBEDDED["loras"], "nope.safetensors"]) == ["nope.safetensors"]


def test_fluxworks_folder_keys_list_only_weight_files(pack, folder_paths, tmp_path):  # noqa: F811
    host = pack.nodes.host
    for kind, key in host.PACK_FOLDERS.items():
        assert folder_paths.folder_names_and_paths[key][1] == set(host.PACK_EXTENSIONS), kind
    assert folder_paths.folder_names_and_paths[pack.nodes.controlnet.DEPTH_FOLDER][1] == set(host.PACK_EXTENSIONS)
    assert "depth" not in folder_paths.folder_names_and_paths  # the generic key other packs may use is left alone
    for name in ("README.md", "lora.bin", "lora.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    host.register_folder("fluxworks_test_filter", str(tmp_path))
    assert folder_paths.get_filename_list("fluxworks_test_filter") == ["lora.safetensors"]
    host.register_folder("fluxworks_test_filter", str(tmp_path))  # registering twice adds the root once
    assert folder_paths.get_folder_paths("fluxworks_test_filter") == [str(tmp_path)]
    del folder_paths.folder_names_and_paths["fluxworks_test_filter"]


def test_a_missing_file_names_the_folders_and_the_fix(pack):  # noqa: F811
    with pytest.raises(FileNotFoundError) as error:
        pack.nodes.host.full_path("loras", "gone.safetensors")
    message = str(error.value)
    assert "'gone.safetensors' was not found in the loras folders" in message
    assert os.path.join("embedded_model", "loras") in message and "pick a listed file" in message


@pytest.fixture(scope="module")
def controlnet_patcher(pack, tmp_path_factory):  # noqa: F811
    path = write_controlnet(str(tmp_path_factory.mktemp("cn") / "canny-test.safetensors"),
                            random_controlnet("xlabs", 0, num_single_layers=0), "xlabs")
    net = pack.flux_controlnet.load_controlnet(path, "default", torch.float32)
    return pack.nodes.host.wrap_patcher(net, torch.device("cpu"), torch.device("cpu"))


@pytest.mark.parametrize("name", ["strength", "start_percent", "end_percent"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_controlnet_settings_must_be_finite(pack, controlnet_patcher, name, bad):  # noqa: F811
    settings = dict(strength=0.7, start_percent=0.0, end_percent=1.0) | {name: bad}
    with pytest.raises(ValueError, match=rf"FluxWorksControlNetApply: {name} is {bad!r}; it must be a finite"):
        pack.nodes.controlnet.FluxWorksControlNetApply().apply([], controlnet_patcher, torch.zeros(1, 32, 32, 3),
                                                               union_mode="none", **settings)
    with pytest.raises(ValueError, match="FluxWorksCannyEdges: blur_sigma is nan"):
        pack.nodes.controlnet.FluxWorksCannyEdges().detect(torch.zeros(1, 32, 32, 3), 0.1, 0.2, math.nan)


def test_control_batches_are_checked_before_sampling(pack, flux, controlnet_patcher):  # noqa: F811
    from tests.lora.lora_helpers import make_patcher

    model = make_patcher(pack, flux).model
    cn = pack.nodes.controlnet
    apply = cn.FluxWorksControlNetApply()
    text = [[torch.zeros(1, 8, 64), {"pooled_output": torch.zeros(1, 64)}]]
    (three,) = apply.apply(text, controlnet_patcher, torch.zeros(3, 32, 32, 3), 0.7, 0.0, 1.0, "none")
    with pytest.raises(ValueError) as error:
        cn.SamplerControls(three, None, model, torch.zeros(1, 16, 4, 4))
    assert str(error.value) == ("the control image of canny-test.safetensors is a batch of 3 but the latent batch is "
                                "1: give just one, or set the latent batch_size to 3")
    (masked,) = apply.apply(text, controlnet_patcher, torch.zeros(1, 32, 32, 3), 0.7, 0.0, 1.0, "none",
                            mask=torch.ones(2, 32, 32))
    with pytest.raises(ValueError, match="the mask of canny-test.safetensors is a batch of 2 but the latent batch "
                                         "is 3: give one .* or 3, or set the latent batch_size to 2"):
        cn.SamplerControls(masked, None, model, torch.zeros(3, 16, 4, 4))
    assert len(cn.SamplerControls(three, None, model, torch.zeros(3, 16, 4, 4)).units) == 1


def test_embedded_text_encoders_load_through_the_node(pack):  # noqa: F811
    (holder,) = pack.nodes.loaders.FluxWorksTextEncoderLoader().load(EMBEDDED["text_encoders"],
                                                                     "clip_l_shapes_tiny.safetensors", "default")
    assert holder.model.clip.config.num_attention_heads == 1
