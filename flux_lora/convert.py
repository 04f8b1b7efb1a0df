"""A LoRA file's tensors -> weight deltas keyed by our models' parameter names, whatever the format.

The format is never guessed up front: every layer name is resolved against all naming schemes (diffusers,
BFL, kohya, XLabs, PEFT-wrapped, OneTrainer, SimpleTuner LyCORIS, text encoders), so mixed files work and
anything left over is reported by name.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import torch

from .adapters import Adapter
from .layers import LoraLayer, PeftScaling, UnsupportedLayer, build_adapters, group_layers
from .targets import PREFIX_RULES, RouteTable, resolve

logger = logging.getLogger(__name__)

# safetensors metadata key under which diffusers stores the PEFT config of each component.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_TEXT_PREFIXES = tuple(p for p, space, _, _ in PREFIX_RULES if space in ("clip", "t5"))

_ARCHITECTURE_HINTS = (
    ("double_stream_modulation", "FLUX.2"),
    ("single_stream_modulation", "FLUX.2"),
    ("to_qkv_mlp_proj", "FLUX.2"),
    ("joint_blocks", "Stable Diffusion 3"),
    ("lora_te2_text_model", "SDXL (two CLIP text encoders)"),
    ("text_encoder_2.text_model", "SDXL (two CLIP text encoders)"),
    ("input_blocks", "Stable Diffusion 1.x/2.x/SDXL (UNet)"),
    ("down_blocks", "Stable Diffusion 1.x/2.x/SDXL (UNet)"),
    ("self_attn.q.", "Wan (video)"),
    ("blocks.0.cross_attn", "a video transformer (Wan/HunyuanVideo)"),
    ("layers.0.attention", "Lumina 2 / Z-Image"),
)


class LoraMismatchError(ValueError):
    """No layer of a LoRA fits the model: it was made for another architecture or model size."""


@dataclass(frozen=True)
class Unmatched:
    key: str
    reason: str


@dataclass(frozen=True)
class ConvertedLora:
    """Deltas per component ("transformer", "clip", "t5"), keyed by parameter name under the holder."""

    patches: dict[str, dict[str, tuple[Adapter, ...]]]
    unmatched: tuple[Unmatched, ...]
    format: str
    layers_matched: int

    def component_patches(self, *components: str) -> dict[str, tuple[Adapter, ...]]:
        out: dict[str, tuple[Adapter, ...]] = {}
        for component in components:
            out.update(self.patches.get(component, {}))
        return out


def peft_scalings(metadata: dict[str, str] | None, adapter_config: dict | None = None) -> dict[str, PeftScaling]:
    """PEFT scaling configs by component prefix ("transformer", "text_encoder"; "" = the whole file)."""
    out: dict[str, PeftScaling] = {}
    if adapter_config:
        out[""] = PeftScaling.from_config(adapter_config)
    raw = (metadata or {}).get(DIFFUSERS_METADATA_KEY)
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the file's '{DIFFUSERS_METADATA_KEY}' metadata is not valid JSON: {exc}") from exc
        grouped: dict[str, dict] = {}
        for key, value in flat.items():
            component, _, field_name = key.partition(".")
            grouped.setdefault(component, {})[field_name] = value
        out.update({component: PeftScaling.from_config(cfg) for component, cfg in grouped.items()})
    return out


def _peft_for(layer_name: str, scalings: dict[str, PeftScaling]) -> tuple[PeftScaling | None, str]:
    """The PEFT config that covers a layer and the layer's name inside that component."""
    component, _, rest = layer_name.partition(".")
    if component in scalings:
        return scalings[component], rest
    return scalings.get(""), layer_name


def _label(prefix_label: str, naming: str, kind: str, software: str) -> str:
    if naming == "xlabs":
        name = "XLabs"
    elif prefix_label == "BFL" and naming == "diffusers":
        name = "diffusers names without prefix"
    elif prefix_label == "BFL" and software == "ai-toolkit":
        name = "ai-toolkit"
    else:
        name = {"BFL": "BFL/ComfyUI", "diffusers": "diffusers/PEFT"}.get(prefix_label, prefix_label)
    text = " text encoder" if naming in ("clip", "t5") else ""
    return f"{name}{text} {kind}"


def _software(metadata: dict[str, str] | None) -> str:
    try:
        return str(json.loads((metadata or {}).get("software", "{}")).get("name", ""))
    except (json.JSONDecodeError, AttributeError):
        return ""


def architecture_hint(keys: list[str]) -> str:
    joined = " ".join(keys[:4000])
    for needle, what in _ARCHITECTURE_HINTS:
        if needle in joined:
            return f"it looks like a LoRA for {what}"
    return "its first keys are " + ", ".join(keys[:4])


def _nothing_matched(source: str, state: dict, layers: dict, shape_misses: list[str], text_skipped: list[str],
                     text_connected: bool) -> str:
    """Why no layer of a LoRA fits the model, and what to do about it."""
    if not layers:
        return (f"{source} holds no LoRA tensors: none of its {len(state)} keys ends like a LoRA's (lora_A/lora_B, "
                f"lora_down/lora_up, lokr_*, hada_*, diff); {architecture_hint(list(state))}. It is not a LoRA "
                "(a full model or an embedding?): load it with the node its kind needs")
    hint = architecture_hint(list(state))
    if hint.startswith("it looks like"):
        return f"{source}: none of its {len(state)} keys matches a FLUX.1 layer; {hint}"
    if shape_misses:
        return (f"{source}: its layer names are FLUX.1 names but none fits this model's shapes "
                f"({shape_misses[0]}); it was made for a model of another size")
    if len(text_skipped) == len(layers):
        if not text_connected:
            return f"{source} only changes the text encoders: connect a FLUX_TEXT_ENCODER to apply it"
        return (f"{source} only changes text encoders, and none of its layers (e.g. '{text_skipped[0]}') is a layer "
                "of the connected CLIP-L or T5: it was made for other text encoders")
    return f"{source}: none of its {len(state)} keys matches a FLUX.1 layer; {hint}"


def _add(patches: dict, component: str, key: str, adapter: Adapter) -> None:
    per_component = patches.setdefault(component, {})
    per_component[key] = per_component.get(key, ()) + (adapter,)


def _place(layer: LoraLayer, route, adapters: dict[str, Adapter], patches: dict) -> str | None:
    """Add a layer's adapters to `patches` along `route`; returns a reason instead when shapes do not fit."""
    weight = adapters.get("weight")
    if weight is not None and tuple(weight.shape) != route.shape:
        return f"shape {tuple(weight.shape)} does not fit the model's {route.shape}"
    bias = adapters.get("bias")
    if bias is not None and tuple(bias.shape) != (route.shape[0],):
        return f"bias shape {tuple(bias.shape)} does not fit the model's ({route.shape[0]},)"
    for target in route.targets:
        for param, adapter in adapters.items():
            part = adapter if target.rows is None else adapter.take_rows(target.rows)
            _add(patches, route.component, f"{target.module}.{param}", part)
    return None


def convert_lora(state: dict[str, torch.Tensor], table: RouteTable, metadata: dict[str, str] | None = None,
                 adapter_config: dict | None = None, source: str = "LoRA") -> ConvertedLora:
    """Convert one LoRA; raises LoraMismatchError when none of its layers fits the model."""
    layers, stray = group_layers(state)
    text_connected = bool(table.dotted["clip"] or table.dotted["t5"])
    scalings = peft_scalings(metadata, adapter_config)
    software = _software(metadata)
    patches: dict[str, dict[str, tuple[Adapter, ...]]] = {}
    unmatched = [Unmatched(k, "not a LoRA tensor name") for k in stray]
    labels: Counter[str] = Counter()
    text_skipped: list[str] = []
    shape_misses: list[str] = []
    for name, layer in layers.items():
        if "dora_scale" in layer.tensors:
            raise ValueError(f"{source}: layer '{name}' is DoRA (dora_scale / lora_magnitude_vector), which "
                             "FluxWorks does not apply; use a plain LoRA/LoKr/LoHa export of it")
        found = resolve(table, name)
        if found is None:
            if name.startswith(_TEXT_PREFIXES):
                text_skipped.append(name)
                reason = ("text-encoder layer: connect a FLUX_TEXT_ENCODER to apply it" if not text_connected
                          else "no layer of this name in the connected text encoders")
            else:
                reason = "no FLUX.1 layer of this name"
            unmatched.extend(Unmatched(k, reason) for k in layer.keys)
            continue
        route, prefix_label = found
        try:
            adapters = build_adapters(layer, *_peft_for(name, scalings))
        except UnsupportedLayer as exc:
            unmatched.extend(Unmatched(k, str(exc)) for k in layer.keys)
            continue
        problem = _place(layer, route, adapters, patches)
        if problem is not None:
            shape_misses.append(f"{name}: {problem}")
            unmatched.extend(Unmatched(k, problem) for k in layer.keys)
            continue
        labels[_label(prefix_label, route.naming, layer.kind, software)] += 1
    matched = sum(labels.values())
    if matched == 0:
        raise LoraMismatchError(_nothing_matched(source, state, layers, shape_misses, text_skipped, text_connected))
    fmt = ", ".join(label for label, _ in labels.most_common()) or "text encoder only"
    return ConvertedLora(patches, tuple(unmatched), fmt, matched)
