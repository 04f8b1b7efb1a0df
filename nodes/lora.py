"""FluxWorksLoraStack (rows of LoRA files -> LORA_STACK) and FluxWorksApplyLoraStack (a LORA_STACK on a
FLUX_MODEL and, optionally, a FLUX_TEXT_ENCODER).

LoRAs become ComfyUI weight patches on a clone of the input patcher: the base object is never mutated, the
weights are fused when the model is loaded (no per-step cost), fp8 weights are re-quantised with ComfyUI's
stochastic rounding layer by layer, and `FastSwitchPatcher` swaps one stack for another in place on the GPU.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import comfy.float
import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter import WeightAdapterBase

from ..flux_lora import RouteTable, add_deltas, convert_lora, linear_shapes, read_lora_file, summed_delta
from ..flux_lora.stack import check_stack, parse_rows
from . import host

logger = logging.getLogger(__name__)

LORA_STACK = "LORA_STACK"  # list of (lora_name, strength, text_strength): see flux_lora/stack.py
KEEP_FREE_BYTES = 4 * 1024**3  # device memory left for activations when originals are kept on the device
_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # the shape core's backups have
_CACHE_BYTES = 2 * 1024**3


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


class FastSwitchPatcher(comfy.model_patcher.ModelPatcher):
    """Switches weight patches in place when the model is already fully loaded on the device.

    Core unpatches weights patched by another clone by moving the whole model to the offload device and loading
    it again (~24 GB each way for FLUX.1 in bf16). Here only the layers patched before or now are rebuilt from
    their originals, which stay on the device while memory allows. Anything else goes through core.
    """

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

    def _original(self, key: str, current: torch.Tensor, device: torch.device) -> torch.Tensor:
        backup = self.backup.get(key)
        if backup is None:  # not patched yet: the current weight is the original
            nbytes = current.numel() * current.element_size()
            keep = current if self._room(device, nbytes) else current.to(self.offload_device)
            self.backup[key] = _Backup(keep, False)
            return current
        original = backup.weight
        if original.device != device:
            original = original.to(device)
            if self._room(device, original.numel() * original.element_size()):
                self.backup[key] = _Backup(original, False)
        return original

    def _switch_weights(self, device: torch.device) -> None:
        for key in sorted(set(self.backup) | set(self.patches)):
            current, _, _ = comfy.model_patcher.get_key_weight(self.model, key)
            original = self._original(key, current, device)
            if key in self.patches:
                merged = comfy.lora.calculate_weight(self.patches[key], original.to(device, torch.float32, copy=True),
                                                     key)
                new = comfy.float.stochastic_rounding(merged, original.dtype,
                                                      seed=comfy.model_patcher.string_to_seed(key))
            else:
                new = original.to(device)
                del self.backup[key]
            comfy.utils.set_attr_param(self.model, key, new)
        self.model.current_weight_patches_uuid = self.patches_uuid


def fast_switch_clone(patcher):
    """A clone of `patcher` that switches LoRA stacks in place. `clone()` builds the parent's class, so a plain
    ModelPatcher's clone is re-classed; the state `clone()` copied is unchanged."""
    clone = patcher.clone()
    if type(clone) is comfy.model_patcher.ModelPatcher:
        clone.__class__ = FastSwitchPatcher
    return clone


def missing_loras(names) -> list[str]:
    available = set(folder_paths.get_filename_list("loras"))
    return [n for n in names if n not in available]


class FluxWorksLoraStack:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rows": ("STRING", {"default": "[]", "tooltip": (
                    'LoRA rows as JSON: [{"lora": "file.safetensors", "strength": 1.0, "enabled": true}, ...]; '
                    'optional "text_strength" (default: strength). The node\'s row widgets edit this.')}),
            },
            "optional": {"lora_stack": (LORA_STACK, {"tooltip": "Rows of another stack, applied as well."})},
        }

    RETURN_TYPES = (LORA_STACK,)
    RETURN_NAMES = ("lora_stack",)
    FUNCTION = "build"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Any number of FLUX.1 LoRAs with strengths and on/off switches, for FluxWorks Apply LoRA Stack."

    @classmethod
    def VALIDATE_INPUTS(cls, rows=None):
        if rows is None:
            return True
        try:
            missing = missing_loras(name for name, _, _ in parse_rows(rows))
        except ValueError as exc:
            return str(exc)
        return True if not missing else f"LoRA files not found in models/loras: {', '.join(missing)}"

    def build(self, rows: str, lora_stack=None):
        entries = (check_stack(lora_stack) if lora_stack is not None else []) + parse_rows(rows)
        missing = missing_loras(name for name, _, _ in entries)
        if missing:
            raise FileNotFoundError(f"LoRA files not found in models/loras: {', '.join(missing)}")
        return (entries,)


class FluxWorksApplyLoraStack:
    def __init__(self) -> None:
        self._files: collections.OrderedDict = collections.OrderedDict()  # (path, size, mtime) -> LoraFile

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"flux_model": (host.FLUX_MODEL,), "lora_stack": (LORA_STACK,)},
            "optional": {"text_encoder": (host.FLUX_TEXT_ENCODER, {
                "tooltip": "Needed only for LoRAs that also trained CLIP-L or T5."})},
        }

    RETURN_TYPES = (host.FLUX_MODEL, host.FLUX_TEXT_ENCODER, "STRING")
    RETURN_NAMES = ("flux_model", "text_encoder", "applied_loras")
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Applies a LoRA stack (diffusers, kohya, BFL, XLabs, ai-toolkit, LyCORIS LoKr/LoHa ...) to a "
                   "FLUX.1 model; applied_loras records names, strengths and hashes; unmatched keys are listed.")

    def _read(self, name: str):
        path = folder_paths.get_full_path_or_raise("loras", name)
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora_file(path)
            while sum(k[1] for k in self._files) > _CACHE_BYTES and len(self._files) > 1:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def apply(self, flux_model, lora_stack, text_encoder=None):
        model = host.expect(flux_model, host.FLUX_MODEL, "FluxWorksApplyLoraStack")
        te = None
        if text_encoder is not None:
            te = host.expect(text_encoder, host.FLUX_TEXT_ENCODER, "FluxWorksApplyLoraStack")
        entries = check_stack(lora_stack)
        table = RouteTable.build(linear_shapes(model.model.transformer, "transformer."),
                                 None if te is None else {**linear_shapes(te.model.clip, "clip."),
                                                          **linear_shapes(te.model.t5, "t5.")})
        loaded = [(i, name, s, ts, self._read(name)) for i, (name, s, ts) in enumerate(entries)]
        # Patches are added in a canonical order, so the merged weights do not depend on the row order.
        loaded.sort(key=lambda e: (e[4].sha256, e[2], e[3]))
        new_model, new_te = fast_switch_clone(model), (fast_switch_clone(te) if te is not None else None)
        done = []
        for index, name, strength, text_strength, lora in loaded:
            converted = convert_lora(lora.tensors, table, lora.metadata, lora.adapter_config, source=name)
            counts = {}
            for patcher, components, s in ((new_model, ("transformer",), strength),
                                           (new_te, ("clip", "t5"), text_strength)):
                patches = converted.component_patches(*components)
                if patcher is None or not patches or s == 0:
                    continue
                added = patcher.add_patches({k: FluxWorksDelta(v, name) for k, v in patches.items()}, s)
                if len(added) != len(patches):
                    raise RuntimeError(f"{name}: {len(patches) - len(added)} patch keys are not model weights")
                counts[components[0]] = len(added)
            unmatched = [f"{u.key} ({u.reason})" for u in converted.unmatched]
            if unmatched:
                logger.warning("FluxWorksApplyLoraStack: %s: %d keys not applied: %s", name, len(unmatched),
                               "; ".join(unmatched))
            record = {"name": name, "strength": strength, "text_strength": text_strength, "sha256": lora.sha256,
                      "size": lora.size, "format": converted.format, "patched": counts, "unmatched": unmatched}
            line = (f"{name} @ {strength:g}: {converted.format}; {sum(counts.values())} weights patched"
                    + (f"; {len(unmatched)} keys not applied: " + ", ".join(unmatched) if unmatched else ""))
            done.append((index, record, line))
        done.sort(key=lambda d: d[0])
        records, report = [d[1] for d in done], [d[2] for d in done]
        new_model.model_options["transformer_options"]["fluxworks_loras"] = records
        summary = json.dumps(records)
        text = "\n".join(report) or "no LoRA applied (empty stack or all rows disabled)"
        logger.info("FluxWorksApplyLoraStack: %s", text)
        return {"ui": {"text": [text]}, "result": (new_model, new_te if new_te is not None else text_encoder, summary)}


NODE_CLASS_MAPPINGS = {
    "FluxWorksLoraStack": FluxWorksLoraStack,
    "FluxWorksApplyLoraStack": FluxWorksApplyLoraStack,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxWorksLoraStack": "FluxWorks LoRA Stack",
    "FluxWorksApplyLoraStack": "FluxWorks Apply LoRA Stack",
}
