"""One test per ComfyUI internal that `nodes/host.py` relies on (its docstring lists them), in an in-process
ComfyUI on the CPU: a ComfyUI upgrade that changes a signature or behaviour the pack uses fails the test named
after it. Plus the structural rule: no node file other than host.py reaches ComfyUI internals."""

from __future__ import annotations

import ast
import inspect
import os

import pytest
import torch

from tests.lora.lora_helpers import make_patcher
from tests.paths import REPO

CPU = torch.device("cpu")


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture
def comfy(pack):
    """ComfyUI's modules, imported inside the pack fixture's host (ComfyUI on the CPU)."""
    import comfy.float
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    import comfy.weight_adapter

    return comfy


@pytest.fixture
def patcher(pack, flux):
    return make_patcher(pack, flux)


def some_linear_key(patcher) -> str:
    return next(k for k, v in patcher.model.state_dict().items() if k.endswith(".weight") and v.ndim == 2)


class Recorder:
    """A WeightAdapterBase that records how comfy.lora.calculate_weight calls it and adds `strength`."""

    def __new__(cls, comfy):
        class _Recorder(comfy.weight_adapter.WeightAdapterBase):
            name = "recorder"

            def __init__(self) -> None:
                self.loaded_keys, self.weights, self.calls = set(), [], []

            def calculate_weight(self, *args):
                self.calls.append(args)
                weight, strength = args[0], args[2]
                return weight.add_(strength)

        return _Recorder()


def test_the_running_comfyui_is_a_checked_version(pack):
    import comfyui_version

    assert comfyui_version.__version__ in pack.nodes.host.CHECKED_COMFYUI_VERSIONS, (
        "a new ComfyUI: run this file, check each internal in nodes/host.py's docstring, then add the version")


def test_model_management_devices(comfy):
    mm = comfy.model_management
    for device in (mm.get_torch_device(), mm.unet_offload_device(), mm.text_encoder_device(),
                   mm.text_encoder_offload_device(), mm.intermediate_device()):
        assert isinstance(device, torch.device)
    assert parameters(mm.should_use_bf16)[0] == "device"
    assert mm.should_use_bf16(CPU) in (True, False)


def test_model_patcher_constructor_and_clone_keep_the_subclass_and_share_the_backup(pack, comfy, patcher):
    assert parameters(comfy.model_patcher.ModelPatcher.__init__)[:4] == ["self", "model", "load_device",
                                                                         "offload_device"]
    host = pack.nodes.host
    assert type(patcher) is host.FastSwitchPatcher  # wrap_patcher builds it: nothing is re-classed later
    patcher.originals_fraction = 0.3
    clone = patcher.clone()
    assert type(clone) is host.FastSwitchPatcher and clone.originals_fraction == 0.3
    assert clone.backup is patcher.backup and clone.parent is patcher and clone.model is patcher.model
    assert type(host.wrap_patcher(torch.nn.Linear(2, 2), CPU, CPU)) is comfy.model_patcher.ModelPatcher


def test_load_models_gpu_arguments(pack, comfy, patcher):
    mm = comfy.model_management
    assert {"models", "memory_required", "force_full_load"} <= set(parameters(mm.load_models_gpu))
    assert pack.nodes.host.load_on_device(patcher) == CPU
    assert any(loaded.model is patcher for loaded in mm.current_loaded_models)


def test_current_loaded_models_entries_have_model_and_model_unload(pack, comfy, patcher):
    mm = comfy.model_management
    pack.nodes.host.load_on_device(patcher)
    [entry] = [e for e in mm.current_loaded_models if e.model is patcher]
    assert isinstance(entry, mm.LoadedModel) and callable(entry.model_unload)
    assert patcher.clone().is_clone(patcher)
    pack.nodes.host._unload(patcher.clone())  # what block offload does: unload any clone of the model
    assert not any(e.model is patcher for e in mm.current_loaded_models)
    assert patcher.model.model_loaded_weight_memory == 0


def test_free_memory_minimum_inference_memory_and_get_free_memory(pack, comfy):
    mm = comfy.model_management
    assert parameters(mm.free_memory)[:2] == ["memory_required", "device"]
    assert mm.minimum_inference_memory() > 0
    assert mm.get_free_memory(CPU) > 0 and pack.nodes.host.free_device_memory(CPU) > 0
    mm.free_memory(0, CPU)  # nothing to free: must not fail


def test_patch_model_and_unpatch_model_take_device_to(pack, comfy, patcher):
    mp = comfy.model_patcher.ModelPatcher
    assert "device_to" in parameters(mp.patch_model) and "device_to" in parameters(mp.unpatch_model)
    key = some_linear_key(patcher)
    before = patcher.model.state_dict()[key].clone()
    patcher.add_patches({key: Recorder(comfy)}, 0.5)
    patcher.patch_model(device_to=CPU)
    assert torch.equal(patcher.model.state_dict()[key], before + 0.5)
    patcher.unpatch_model(device_to=CPU)
    assert torch.equal(patcher.model.state_dict()[key], before)


def test_add_patches_returns_the_keys_it_took_as_five_tuples(comfy, patcher):
    key = some_linear_key(patcher)
    adapter = Recorder(comfy)
    taken = patcher.add_patches({key: adapter, "transformer.no_such_layer.weight": adapter}, 0.25)
    assert taken == [key]
    [(strength_patch, patch, strength_model, offset, function)] = patcher.patches[key]
    assert (strength_patch, patch, strength_model, offset, function) == (0.25, adapter, 1.0, None, None)


def test_calculate_weight_calls_a_weight_adapter_with_the_arguments_fluxworks_delta_takes(pack, comfy):
    adapter = Recorder(comfy)
    weight = torch.zeros(3, 2)
    out = comfy.lora.calculate_weight([(0.5, adapter, 1.0, None, None)], weight, "layer.weight")
    assert torch.equal(out, torch.full((3, 2), 0.5))
    [(w, key, strength, strength_model, offset, function, intermediate_dtype, original)] = adapter.calls
    assert (key, strength, strength_model, offset, intermediate_dtype, original) == (
        "layer.weight", 0.5, 1.0, None, torch.float32, None)
    probe = torch.zeros(1)
    assert function(probe) is probe  # "no per-patch transform" is the identity: FluxWorksDelta adds in place
    base = comfy.weight_adapter.WeightAdapterBase
    assert parameters(base.calculate_weight) == parameters(pack.nodes.host.FluxWorksDelta.calculate_weight)
    assert issubclass(pack.nodes.host.FluxWorksDelta, base)


def test_partially_load_is_what_every_load_calls(pack, comfy, patcher, monkeypatch):
    mp, mm = comfy.model_patcher.ModelPatcher, comfy.model_management
    ours = pack.nodes.host.FastSwitchPatcher.partially_load
    assert parameters(mp.partially_load) == parameters(ours) == ["self", "device_to", "extra_memory",
                                                                 "force_patch_weights"]
    calls = []
    monkeypatch.setattr(pack.nodes.host.FastSwitchPatcher, "partially_load",
                        lambda self, *a, **k: calls.append((self, a, k)) or ours(self, *a, **k))
    pack.nodes.host.load_on_device(patcher)
    assert calls and calls[-1][0] is patcher and calls[-1][1][0] == CPU
    assert parameters(mm.LoadedModel.model_use_more_vram)[:2] == ["self", "extra_memory"]


def test_patcher_state_a_fast_switch_reads(pack, comfy, patcher):
    mp = comfy.model_patcher.ModelPatcher
    assert "skip_and_inject_on_exit_only" in parameters(mp.use_ejected)
    assert parameters(mp.unpatch_model)[1:3] == ["device_to", "unpatch_weights"]
    assert "load_weights" in parameters(mp.patch_model)
    assert parameters(mp.apply_hooks)[1] == "hooks" and "force_apply" in parameters(mp.apply_hooks)
    assert (patcher.hook_backup, patcher.weight_inplace_update, patcher.forced_hooks) == ({}, False, None)
    assert patcher.model.current_weight_patches_uuid is None
    pack.nodes.host.load_on_device(patcher)
    m = patcher.model
    assert m.current_weight_patches_uuid == patcher.patches_uuid
    assert m.model_lowvram is False and m.model_loaded_weight_memory > 0 and str(m.device) == str(CPU)


def test_backup_entries_are_read_by_weight_and_inplace_update(pack, comfy, patcher):
    key = some_linear_key(patcher)
    before = patcher.model.state_dict()[key].clone()
    patcher.add_patches({key: Recorder(comfy)}, 1.0)
    patcher.patch_weight_to_device(key, device_to=CPU)
    core_entry = patcher.backup[key]
    assert core_entry._fields == pack.nodes.host.Original._fields[:2] == ("weight", "inplace_update")
    # core restores from our 3-field entries as from its own
    patcher.backup[key] = pack.nodes.host.Original(core_entry.weight, False, True)
    patcher.unpatch_model(device_to=CPU)
    assert torch.equal(patcher.model.state_dict()[key], before) and patcher.backup == {}


def test_get_key_weight_returns_weight_set_func_convert_func(comfy, patcher):
    key = some_linear_key(patcher)
    weight, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    assert weight is patcher.model.get_parameter(key) and set_func is None and convert_func is None


def test_stochastic_rounding_and_string_to_seed(comfy):
    seed = comfy.model_patcher.string_to_seed("transformer.x.weight")
    assert isinstance(seed, int) and seed == comfy.model_patcher.string_to_seed("transformer.x.weight")
    assert parameters(comfy.float.stochastic_rounding) == ["value", "dtype", "seed"]
    value = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(comfy.float.stochastic_rounding(value, torch.bfloat16, seed=seed), value.to(torch.bfloat16))
    fp8 = [comfy.float.stochastic_rounding(value, torch.float8_e4m3fn, seed=seed) for _ in range(2)]
    assert fp8[0].dtype == torch.float8_e4m3fn and torch.equal(fp8[0].view(torch.uint8), fp8[1].view(torch.uint8))


def test_set_attr_param_replaces_the_parameter(comfy, patcher):
    key = some_linear_key(patcher)
    new = torch.ones_like(patcher.model.get_parameter(key))
    comfy.utils.set_attr_param(patcher.model, key, new)
    param = patcher.model.get_parameter(key)
    assert isinstance(param, torch.nn.Parameter) and not param.requires_grad and torch.equal(param, new)


def test_model_function_wrapper_gets_input_timestep_c_with_sample_sigmas_and_guidance(pack):
    """Core's KSampler path on a tiny core FLUX.1 model: what FluxWorks Schedule Core Model's wrapper reads."""
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    unet = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32,
            "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    config = comfy.supported_models.Flux(unet)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(config.get_model({}, device=CPU), CPU, CPU)
    seen = []

    def guidance_at(sigmas, sigma):
        seen.append((sigmas.clone(), float(sigma.flatten()[0])))
        return 2.0

    scheduled = pack.nodes.host.schedule_core_guidance(model, guidance_at)
    assert "model_function_wrapper" not in model.model_options  # a clone carries it, the input is untouched
    cond = [[torch.randn(1, 4, 32), {"pooled_output": torch.randn(1, 32), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    outputs = [comfy.sample.sample(m, noise, 2, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True)
               for m in (model, scheduled)]
    assert [round(s, 4) for _, s in seen] == [1.0, 0.7595]  # both steps, the sampler's own sigmas
    assert torch.equal(seen[0][0], seen[1][0]) and len(seen[0][0]) == 3
    assert not torch.equal(outputs[0], outputs[1])  # guidance 2 instead of 3.5 reached the model


def test_tokenizer_folders_hold_the_clip_and_t5_files(pack):
    clip, t5 = pack.nodes.host.tokenizer_folders()
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(clip))
    assert "tokenizer.json" in os.listdir(t5)


def test_folder_names_and_paths_entries_are_paths_and_extensions(pack, tmp_path):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["loras"]
    assert isinstance(paths, list) and ".safetensors" in extensions
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert folder_paths.filter_files_extensions(["notes.txt", "a.safetensors"], set()) == ["a.safetensors",
                                                                                           "notes.txt"]
    folder_paths.add_model_folder_path("fluxworks_internals_probe", str(tmp_path))
    try:  # core creates an unknown key without a filter: every file is listed
        assert folder_paths.folder_names_and_paths["fluxworks_internals_probe"] == ([str(tmp_path)], set())
        assert sorted(folder_paths.get_filename_list("fluxworks_internals_probe")) == ["a.safetensors", "notes.txt"]
    finally:
        del folder_paths.folder_names_and_paths["fluxworks_internals_probe"]


def _bfl_state(variant: str) -> dict[str, torch.Tensor]:
    from devtools.tiny_models import diffusers_to_bfl, random_flux

    return diffusers_to_bfl({k: v.detach() for k, v in random_flux(variant, 0).state_dict().items()})


def test_model_config_from_unet_fixes_flux_heads_and_axes_and_reads_the_rest(pack):
    """What core_flux_model replaces (num_heads, axes_dim: FLUX.1's 24 x 128) and keeps (the variant class, the
    other FluxParams fields, read from the shapes), on the 2-head tiny model."""
    import comfy.model_detection
    import comfy.supported_models

    from fluxworks.flux_models.transformer import infer_config
    from fluxworks.flux_models.transformer_keys import bfl_to_diffusers

    for variant, cls in (("dev", comfy.supported_models.Flux), ("schnell", comfy.supported_models.FluxSchnell)):
        state = _bfl_state(variant)
        config = comfy.model_detection.model_config_from_unet(state, "", metadata={})
        assert type(config) is cls and config.scaled_fp8 is None and config.layer_quant_config is None
        unet = config.unet_config
        assert unet["image_model"] == "flux" and unet["num_heads"] == 24 and unet["axes_dim"] == [16, 56, 56]
        ours = pack.nodes.host.core_flux_geometry(infer_config(bfl_to_diffusers(state)))
        assert set(ours) <= set(unet)
        assert {k: v for k, v in ours.items() if k not in ("num_heads", "axes_dim")} == \
            {k: unet[k] for k in ours if k not in ("num_heads", "axes_dim")}
        assert ours["num_heads"] == 2


def test_convert_diffusers_mmdit_gives_bfl_keys_for_any_width(pack):
    import comfy.model_detection

    from fluxworks.flux_models.transformer_keys import bfl_to_diffusers

    bfl = _bfl_state("dev")
    converted = comfy.model_detection.convert_diffusers_mmdit(bfl_to_diffusers(bfl), "")
    assert converted.keys() == bfl.keys() and all(torch.equal(converted[k], bfl[k]) for k in bfl)


def test_load_diffusion_model_state_dict_steps_and_unet_loader_choices(pack):
    """core_flux_model repeats core's loading steps after detection; a core that changes them fails here."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    import nodes

    source = inspect.getsource(comfy.sd.load_diffusion_model_state_dict)
    for step in ("model_detection.model_config_from_unet(sd, \"\", metadata=metadata)",
                 "model_detection.convert_diffusers_mmdit(sd, \"\")",
                 "model_management.unet_dtype(model_params=parameters, supported_dtypes=unet_weight_dtype, "
                 "weight_dtype=weight_dtype)",
                 "model_management.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)",
                 "model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)",
                 "model_config.optimizations[\"fp8\"] = True", "model_config.get_model(new_sd, \"\")",
                 "model.load_model_weights(new_sd, \"\")", "comfy.model_patcher.ModelPatcher(model, load_device="):
        assert step in source, step
    assert parameters(mm.unet_dtype)[:4] == ["device", "model_params", "supported_dtypes", "weight_dtype"]
    assert parameters(mm.unet_manual_cast) == ["weight_dtype", "inference_device", "supported_dtypes"]
    state = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(2, 2, dtype=torch.float8_e4m3fn),
             "c": torch.zeros(1, dtype=torch.float8_e4m3fn)}
    assert comfy.utils.calculate_parameters(state) == 8 and comfy.utils.weight_dtype(state) == torch.float8_e4m3fn
    choices = nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert choices == list(pack.nodes.host.CORE_WEIGHT_DTYPES)
    loader = inspect.getsource(nodes.UNETLoader.load_unet)
    assert loader.count("model_options[\"dtype\"]") == 3 and "model_options[\"fp8_optimizations\"] = True" in loader


def test_get_model_load_model_weights_and_process_unet_state_dict(pack):
    """A Flux config with a given unet_config builds that model; its weights load under BFL names as stored."""
    import comfy.model_detection

    state = _bfl_state("dev")
    config = comfy.model_detection.model_config_from_unet(state, "", metadata={})
    config.unet_config.update(num_heads=2)
    config.set_inference_dtype(torch.float32, None)
    assert config.process_unet_state_dict(dict(state)).keys() == state.keys()
    model = config.get_model(state, "")
    assert set(model.diffusion_model.state_dict()) == set(state)
    model.load_model_weights(dict(state), "")
    key = "double_blocks.0.img_attn.qkv.weight"
    assert model.diffusion_model.num_heads == 2 and torch.equal(model.diffusion_model.state_dict()[key], state[key])


# Node files may use ComfyUI's documented node API only; everything else goes through host.py.
NODE_API = {"folder_paths", "latent_preview", "comfy.utils.ProgressBar", "comfy.latent_formats.Flux",
            "comfy.model_management.throw_exception_if_processing_interrupted"}
# nodes/sampler.py is being rewritten elsewhere: it should call host.intermediate_device / host.free_device_memory
NOT_YET_MOVED = {("sampler.py", "comfy.model_management.intermediate_device"),
                 ("sampler.py", "comfy.model_management.get_free_memory")}


def comfy_uses(path: str) -> set[str]:
    """Dotted names of ComfyUI modules and attributes a file uses (`import comfy.x as y; y.f` -> comfy.x.f)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    aliases, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("comfy", "folder_paths", "latent_preview", "comfy_api", "comfy_extras"):
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] in ("comfy", "comfy_api", "comfy_extras"):
            used |= {f"{node.module}.{a.name}" for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                dotted = ".".join([base.id, *reversed(parts)])
                for alias, module in aliases.items():
                    if dotted.startswith(alias + "."):
                        rest = dotted[len(alias) + 1:].split(".")
                        used.add(f"{module}.{rest[0]}" if module != "folder_paths" else "folder_paths")
    return used


def test_only_host_uses_comfyui_internals():
    nodes_dir = os.path.join(REPO, "nodes")
    found = {}
    for name in sorted(os.listdir(nodes_dir)):
        if not name.endswith(".py") or name == "host.py":
            continue
        outside = {u for u in comfy_uses(os.path.join(nodes_dir, name))
                   if u not in NODE_API and u.split(".")[0] not in NODE_API and (name, u) not in NOT_YET_MOVED}
        if outside:
            found[name] = sorted(outside)
    assert found == {}, f"ComfyUI internals outside nodes/host.py: {found}"
    assert "current_loaded_models" in open(os.path.join(nodes_dir, "host.py"), encoding="utf-8").read()
