"""FluxWorksLoraStack (rows of LoRA files -> LORA_STACK) and FluxWorksApplyLoraStack (a LORA_STACK on a
FLUX_MODEL and, optionally, a FLUX_TEXT_ENCODER).

LoRAs become ComfyUI weight patches on a clone of the input patcher (see `host.FastSwitchPatcher`): the base
object is never mutated, the weights are fused when the model is loaded (no per-step cost), fp8 weights are
re-quantised with ComfyUI's stochastic rounding layer by layer, and a stack switch rebuilds only the patched
layers in place on the GPU, keeping original weights there within a stated memory budget.
"""

from __future__ import annotations

import collections
import json
import logging
import os

from ..flux_lora import RouteTable, convert_lora, linear_shapes, read_lora_file
from ..flux_lora.stack import check_stack, parse_rows
from . import host

logger = logging.getLogger(__name__)

LORA_STACK = "LORA_STACK"  # list of (lora_name, strength, text_strength): see flux_lora/stack.py
_CACHE_BYTES = 2 * 1024**3


def missing_loras(names) -> list[str]:
    available = set(host.filename_list("loras"))
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
    """Applies a LORA_STACK as weight patches on clones of the model (and text encoder) patchers.

    Switching stacks between prompts rebuilds only the LoRA layers on the GPU. `switch_vram` bounds the GPU memory
    that keeps their original weights for that: up to this fraction of the model's size stays on the GPU, the rest
    in CPU memory, copied back at each switch. Peak GPU memory while a stack is loaded is model x (1 + switch_vram)
    plus activations; 0 matches core's peak, 1 keeps every original and switches fastest (see docs/lora.md)."""

    def __init__(self) -> None:
        self._files: collections.OrderedDict = collections.OrderedDict()  # (path, size, mtime) -> LoraFile

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"flux_model": (host.FLUX_MODEL,), "lora_stack": (LORA_STACK,)},
            "optional": {
                "text_encoder": (host.FLUX_TEXT_ENCODER, {
                    "tooltip": "Needed only for LoRAs that also trained CLIP-L or T5."}),
                "switch_vram": ("FLOAT", {
                    "default": host.DEFAULT_ORIGINALS_FRACTION, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "GPU memory for the original weights of LoRA layers, as a fraction of the model's "
                               "size, so the next stack switches in place. The rest wait in CPU memory and are "
                               "copied back on a switch (slower). Peak GPU memory: model x (1 + this)."}),
            },
        }

    RETURN_TYPES = (host.FLUX_MODEL, host.FLUX_TEXT_ENCODER, "STRING")
    RETURN_NAMES = ("flux_model", "text_encoder", "applied_loras")
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Applies a LoRA stack (diffusers, kohya, BFL, XLabs, ai-toolkit, LyCORIS LoKr/LoHa ...) to a "
                   "FLUX.1 model; applied_loras records names, strengths and hashes; unmatched keys are listed.")

    def _read(self, name: str):
        path = host.full_path("loras", name)
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora_file(path)
            while sum(k[1] for k in self._files) > _CACHE_BYTES and len(self._files) > 1:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def apply(self, flux_model, lora_stack, text_encoder=None, switch_vram=host.DEFAULT_ORIGINALS_FRACTION):
        node = "FluxWorksApplyLoraStack"
        model = host.expect(flux_model, host.FLUX_MODEL, node)
        te = None
        if text_encoder is not None:
            te = host.expect(text_encoder, host.FLUX_TEXT_ENCODER, node)
        if isinstance(switch_vram, bool) or not isinstance(switch_vram, int | float) or not 0 <= switch_vram <= 1:
            raise ValueError(f"{node}: switch_vram must be a number from 0 to 1 (a fraction of the model's size), "
                             f"got {switch_vram!r}")
        entries = check_stack(lora_stack)
        table = RouteTable.build(linear_shapes(model.model.transformer, "transformer."),
                                 None if te is None else {**linear_shapes(te.model.clip, "clip."),
                                                          **linear_shapes(te.model.t5, "t5.")})
        loaded = [(i, name, s, ts, self._read(name)) for i, (name, s, ts) in enumerate(entries)]
        # Patches are added in a canonical order, so the merged weights do not depend on the row order.
        loaded.sort(key=lambda e: (e[4].sha256, e[2], e[3]))
        new_model = host.lora_clone(model, switch_vram, node)
        new_te = host.lora_clone(te, switch_vram, node) if te is not None else None
        done = []
        for index, name, strength, text_strength, lora in loaded:
            converted = convert_lora(lora.tensors, table, lora.metadata, lora.adapter_config, source=name)
            counts = {}
            for patcher, components, s in ((new_model, ("transformer",), strength),
                                           (new_te, ("clip", "t5"), text_strength)):
                patches = converted.component_patches(*components)
                if patcher is None or not patches or s == 0:
                    continue
                added = host.add_lora_patches(patcher, patches, s, name)
                if added != len(patches):
                    raise RuntimeError(f"{name}: {len(patches) - added} patch keys are not model weights")
                counts[components[0]] = added
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
