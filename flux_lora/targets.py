"""Where a LoRA's layer names point in our models: every naming scheme FLUX.1 LoRAs use, mapped onto the
diffusers `FluxTransformer2DModel` and the CLIP-L / T5 text encoders, with shapes read from the live model.

A fused BFL layer (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`) routes to several diffusers
layers, each taking its row range of the LoRA's output; `final_layer.adaLN_modulation.1` swaps its two halves
(BFL stores (shift, scale), diffusers (scale, shift)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .adapters import Rows

# Holder attribute under which each model sits (FluxModel.transformer, FluxTextEncoder.clip / .t5).
COMPONENT_ROOTS = {"transformer": "transformer.", "clip": "clip.", "t5": "t5."}


@dataclass(frozen=True)
class Target:
    module: str  # module path under the holder, e.g. "transformer.transformer_blocks.0.attn.to_q"
    rows: Rows | None  # rows of the LoRA's output that feed this module; None = all of them


@dataclass(frozen=True)
class Route:
    component: str  # "transformer", "clip" or "t5"
    targets: tuple[Target, ...]
    shape: tuple[int, int]  # (out, in) the LoRA layer must have
    naming: str  # "diffusers", "bfl", "xlabs", "clip" or "t5": which family of names matched


def linear_shapes(module: torch.nn.Module, root: str = "") -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear under `module`, keyed by `root` + module path."""
    return {root + name: (m.out_features, m.in_features) for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _single(component: str, module: str, shape: tuple[int, int], naming: str) -> Route:
    return Route(component, (Target(module, None),), shape, naming)


def _fused(component: str, parts: list[tuple[str, tuple[int, int]]], naming: str) -> Route:
    """Route of a layer whose output is the concatenation of `parts` (module, shape) in order."""
    targets, start = [], 0
    for module, (out, _) in parts:
        targets.append(Target(module, ((start, start + out),)))
        start += out
    return Route(component, tuple(targets), (start, parts[0][1][1]), naming)


def _transformer_routes(shapes: dict[str, tuple[int, int]]) -> dict[str, Route]:
    """Dotted layer name -> Route for diffusers, BFL, XLabs and fused-diffusers names of the transformer."""
    root = COMPONENT_ROOTS["transformer"]
    own = {k[len(root):]: v for k, v in shapes.items() if k.startswith(root)}
    routes = {name: _single("transformer", root + name, shape, "diffusers") for name, shape in own.items()}

    def part(name: str) -> tuple[str, tuple[int, int]]:
        return root + name, own[name]

    def alias(bfl_name: str, diffusers_name: str) -> None:
        if diffusers_name in own:
            routes[bfl_name] = _single("transformer", root + diffusers_name, own[diffusers_name], "bfl")

    blocks = sorted({int(m.group(1)) for k in own if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        img_qkv = [part(d + f"attn.{n}") for n in ("to_q", "to_k", "to_v")]
        txt_qkv = [part(d + f"attn.{n}") for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        for name, parts in ((b + "img_attn.qkv", img_qkv), (b + "txt_attn.qkv", txt_qkv)):
            routes[name] = _fused("transformer", parts, "bfl")
        routes[d + "attn.to_qkv"] = _fused("transformer", img_qkv, "diffusers")
        routes[d + "attn.to_added_qkv"] = _fused("transformer", txt_qkv, "diffusers")
        for bfl, diff in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                          ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                          ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                          ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")):
            alias(b + bfl, d + diff)
        # XLabs attention-processor LoRAs: lora1 = image stream, lora2 = text stream.
        for xlabs, bfl in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                           ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            routes[b + "processor." + xlabs] = replace(routes[b + bfl], naming="xlabs")

    singles = sorted({int(m.group(1)) for k in own if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for i in singles:
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        qkv = [part(s + f"attn.{n}") for n in ("to_q", "to_k", "to_v")]
        routes[b + "linear1"] = _fused("transformer", [*qkv, part(s + "proj_mlp")], "bfl")
        routes[s + "attn.to_qkv"] = _fused("transformer", qkv, "diffusers")
        alias(b + "linear2", s + "proj_out")
        alias(b + "modulation.lin", s + "norm.linear")
        xlabs_qkv = _fused("transformer", qkv, "xlabs")
        xlabs_proj = replace(routes[b + "linear2"], naming="xlabs")
        # "processor.qkv_lora.down.weight" also parses as layer "processor.qkv" + old diffusers "_lora.down".
        for name in ("processor.qkv_lora", "processor.qkv"):
            routes[b + name] = xlabs_qkv
        for name in ("processor.proj_lora", "processor.proj"):
            routes[b + name] = xlabs_proj

    for bfl, diff in (("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                      ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                      ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                      ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                      ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                      ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                      ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
        alias(bfl, diff)
    if "norm_out.linear" in own:
        out, inp = own["norm_out.linear"]
        half = out // 2
        target = Target(root + "norm_out.linear", ((half, out), (0, half)))
        routes["final_layer.adaLN_modulation.1"] = Route("transformer", (target,), (out, inp), "bfl")
    return routes


def _text_routes(shapes: dict[str, tuple[int, int]], component: str) -> dict[str, Route]:
    """CLIP-L names as transformers 4 spelled them (`text_model.encoder...`), whatever this transformers does."""
    root = COMPONENT_ROOTS[component]
    routes = {}
    for key, shape in shapes.items():
        if not key.startswith(root):
            continue
        name = key[len(root):]
        canonical = name if component == "t5" or name.startswith("text_model.") else "text_model." + name
        routes[canonical] = _single(component, key, shape, component)
    return routes


@dataclass(frozen=True)
class RouteTable:
    """Dotted and underscored (kohya-style) layer names per namespace ("transformer", "clip", "t5")."""

    dotted: dict[str, dict[str, Route]]
    underscored: dict[str, dict[str, Route]]

    @classmethod
    def build(cls, transformer_shapes: dict[str, tuple[int, int]],
              text_shapes: dict[str, tuple[int, int]] | None = None) -> RouteTable:
        text_shapes = text_shapes or {}
        dotted = {"transformer": _transformer_routes(transformer_shapes),
                  "clip": _text_routes(text_shapes, "clip"), "t5": _text_routes(text_shapes, "t5")}
        underscored = {space: {name.replace(".", "_"): route for name, route in table.items()}
                       for space, table in dotted.items()}
        return cls(dotted, underscored)

    def lookup(self, space: str, style: str, name: str) -> Route | None:
        table = self.dotted if style == "dotted" else self.underscored
        return table[space].get(name)


# (prefix, namespace, style, label) tried in order; the first whose remainder names a known layer wins.
PREFIX_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("text_encoders.clip_l.transformer.", "clip", "dotted", "ComfyUI"),
    ("text_encoders.t5xxl.transformer.", "t5", "dotted", "ComfyUI"),
    ("text_encoder_2.", "t5", "dotted", "diffusers"),
    ("text_encoder.", "clip", "dotted", "diffusers"),
    ("lora_te1_", "clip", "underscored", "kohya"),
    ("lora_te2_", "t5", "underscored", "kohya"),
    ("lora_te3_", "t5", "underscored", "kohya"),
    ("transformer.base_model.model.", "transformer", "dotted", "PEFT"),
    ("base_model.model.", "transformer", "dotted", "PEFT"),
    ("model.diffusion_model.", "transformer", "dotted", "BFL"),
    ("diffusion_model.", "transformer", "dotted", "BFL"),
    ("transformer.", "transformer", "dotted", "diffusers"),
    ("lora_unet_", "transformer", "underscored", "kohya"),
    ("lora_transformer_", "transformer", "underscored", "OneTrainer"),
    ("lycoris_", "transformer", "underscored", "SimpleTuner LyCORIS"),
    ("", "transformer", "dotted", "BFL"),
)


def resolve(table: RouteTable, layer: str) -> tuple[Route, str] | None:
    """(route, prefix label) for a LoRA layer name, or None when it names nothing in our models."""
    for prefix, space, style, label in PREFIX_RULES:
        if layer.startswith(prefix):
            route = table.lookup(space, style, layer[len(prefix):])
            if route is not None:
                return route, label
    return None
