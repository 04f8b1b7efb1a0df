"""Tiny random LoRAs for the tiny FLUX.1 models, written in every file format the LoRA stack reads.

One `TinyLora` (low-rank factors per BFL-named layer, optionally CLIP-L layers) can be written as diffusers/PEFT
(`transformer.` + lora_A/lora_B, alpha baked, in safetensors metadata or as `.alpha` keys), PEFT-wrapped
(`base_model.model.`), kohya (`lora_unet_` + alpha, also the `split_qkv` block-diagonal layout), BFL/ComfyUI
(`diffusion_model.` + lora_up/lora_down), ai-toolkit (`diffusion_model.` + lora_A/lora_B), OneTrainer
(`lora_transformer_`) and XLabs (`processor.qkv_lora1`). `TinyLycoris` holds LoKr or LoHa factors written with
kohya or SimpleTuner (`lycoris_`) names. Each knows its own dense deltas, the test oracle.

The BFL -> diffusers naming here is written out independently of `flux_lora.targets`, on purpose.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from devtools.tiny_models import diffusers_to_bfl

LORA_FORMATS = ("diffusers", "diffusers_metadata", "diffusers_alpha_keys", "peft_wrapped", "kohya",
                "kohya_split_qkv", "bfl", "ai_toolkit", "onetrainer", "xlabs")
LYCORIS_FORMATS = ("kohya", "bfl", "simpletuner")

_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
           "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
           "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_ATTENTION_MLP = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")


def bfl_linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of a diffusers FLUX.1 model, under its BFL name."""
    bfl = diffusers_to_bfl({k: v for k, v in model.state_dict().items()})
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in bfl.items() if k.endswith(".weight") and v.ndim == 2}


def to_diffusers_names(name: str, hidden: int) -> list[tuple[str, slice]]:
    """BFL layer -> [(diffusers layer, rows of the BFL output it takes)]; norm_out swaps shift and scale."""
    parts = name.split(".")
    if parts[0] == "double_blocks":
        base, rest = f"transformer_blocks.{parts[1]}.", ".".join(parts[2:])
        if rest in ("img_attn.qkv", "txt_attn.qkv"):
            names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [(f"{base}attn.{n}", slice(i * hidden, (i + 1) * hidden)) for i, n in enumerate(names)]
        return [(base + _DOUBLE[rest], slice(None))]
    if parts[0] == "single_blocks":
        base, rest = f"single_transformer_blocks.{parts[1]}.", ".".join(parts[2:])
        if rest == "linear1":
            qkv = [(f"{base}attn.to_{n}", slice(i * hidden, (i + 1) * hidden)) for i, n in enumerate("qkv")]
            return [*qkv, (base + "proj_mlp", slice(3 * hidden, None))]
        return [(base + {"linear2": "proj_out", "modulation.lin": "norm.linear"}[rest], slice(None))]
    if name == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", "swap")]
    return [(_TOP[name], slice(None))]


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    if rows == "swap":
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first]).contiguous()
    return t[rows].contiguous()


@dataclass
class TinyLora:
    """ΔW = (alpha / rank) · up @ down for each BFL-named layer (and CLIP-L layers under `text`)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # BFL name -> (up (out, r), down (r, in))
    hidden: int
    rank: int
    alpha: float
    text: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # text_model.encoder...

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def dense_deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.scale * up @ down for name, (up, down) in self.layers.items()}

    def text_deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.scale * up @ down for name, (up, down) in self.text.items()}


def random_lora(model, rank: int = 4, alpha: float = 8.0, seed: int = 0, layers: str = "all", clip=None,
                magnitude: float = 0.08) -> TinyLora:
    """Random factors for `layers` = "all" (every Linear), "attention_mlp" or "xlabs" (what XLabs trains)."""
    shapes = bfl_linear_shapes(model)
    hidden = shapes["img_in"][0]
    if layers == "attention_mlp":
        shapes = {k: v for k, v in shapes.items() if k.endswith(_ATTENTION_MLP)}
    elif layers == "xlabs":
        shapes = {k: v for k, v in shapes.items() if k.endswith(("_attn.qkv", "_attn.proj", "linear1"))}
    elif layers != "all":
        raise ValueError(f"unknown layer set {layers!r}")
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (out, inp) in shapes.items():
        up = torch.randn(out, rank, generator=g) * magnitude
        if layers == "xlabs" and name.endswith("linear1"):
            up[3 * hidden:] = 0  # XLabs' single-block LoRA only touches q, k, v
        factors[name] = (up, torch.randn(rank, inp, generator=g) * magnitude)
    text = {}
    if clip is not None:
        for name, m in clip.named_modules():
            if isinstance(m, torch.nn.Linear) and ".self_attn." in name:
                canonical = name if name.startswith("text_model.") else "text_model." + name
                text[canonical] = (torch.randn(m.out_features, rank, generator=g) * magnitude,
                                   torch.randn(rank, m.in_features, generator=g) * magnitude)
    return TinyLora(factors, hidden, rank, alpha, text)


def _diffusers_layers(lora: TinyLora, scale_up: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, (up, down) in lora.layers.items():
        for target, rows in to_diffusers_names(name, lora.hidden):
            part = _take(up, rows) * scale_up
            if part.abs().max() > 0:
                out[target] = (part, down.clone())
    return out


def _alpha_tensor(alpha: float) -> torch.Tensor:
    return torch.tensor(alpha, dtype=torch.float32)


def lora_state(lora: TinyLora, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of `lora` written in format `fmt` (see LORA_FORMATS)."""
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    text_kohya = {"lora_te1_" + n.replace(".", "_"): f for n, f in lora.text.items()}
    if fmt in ("diffusers", "diffusers_metadata", "diffusers_alpha_keys", "peft_wrapped"):
        baked = fmt in ("diffusers", "peft_wrapped")
        prefix = "base_model.model." if fmt == "peft_wrapped" else "transformer."
        text = {} if fmt == "peft_wrapped" else {"text_encoder." + n: f for n, f in lora.text.items()}
        for name, (up, down) in {**{prefix + k: v for k, v in _diffusers_layers(lora, 1.0).items()}, **text}.items():
            state[f"{name}.lora_A.weight"] = down
            state[f"{name}.lora_B.weight"] = up * (lora.scale if baked else 1.0)
            if fmt == "diffusers_alpha_keys":
                state[f"{name}.alpha"] = _alpha_tensor(lora.alpha)
        if fmt == "diffusers_metadata":  # what diffusers' save_lora_weights writes: each component's LoraConfig
            packed = {}
            for component, names in (("transformer", _diffusers_layers(lora, 1.0)), ("text_encoder", lora.text)):
                config = {"r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": False, "use_dora": False,
                          "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(names)}
                packed.update({f"{component}.{k}": v for k, v in config.items()})
            metadata["lora_adapter_metadata"] = json.dumps(packed)
    elif fmt in ("kohya", "bfl", "ai_toolkit"):
        names = {"kohya": lambda n: "lora_unet_" + n.replace(".", "_"),
                 "bfl": lambda n: "diffusion_model." + n, "ai_toolkit": lambda n: "diffusion_model." + n}[fmt]
        pairs = {names(n): f for n, f in lora.layers.items()}
        if fmt == "kohya":
            pairs.update(text_kohya)
        for name, (up, down) in pairs.items():
            if fmt == "ai_toolkit":
                state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up * lora.scale
            else:
                state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
                state[f"{name}.alpha"] = _alpha_tensor(lora.alpha)
        if fmt == "ai_toolkit":
            metadata["software"] = json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"})
    elif fmt == "kohya_split_qkv":
        # sd-scripts `split_qkv`: one down per q/k/v stacked (3r, in) and a block-diagonal up (3h, 3r).
        for name, (up, down) in lora.layers.items():
            key = "lora_unet_" + name.replace(".", "_")
            alpha = lora.alpha
            if name.endswith(("attn.qkv", "linear1")):
                chunks = [up[i * lora.hidden:(i + 1) * lora.hidden] for i in range(3)]
                if name.endswith("linear1"):
                    chunks.append(up[3 * lora.hidden:])
                up, down = torch.block_diag(*chunks), torch.cat([down] * len(chunks))
                alpha = lora.alpha * len(chunks)  # kohya scales by alpha / stored rank
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = _alpha_tensor(alpha)
    elif fmt == "onetrainer":
        for name, (up, down) in _diffusers_layers(lora, 1.0).items():
            key = "lora_transformer_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = _alpha_tensor(lora.alpha)
    elif fmt == "xlabs":
        names = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
                 "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}
        for name, (up, down) in lora.layers.items():
            block, index, rest = name.split(".", 2)
            if rest not in names:
                raise ValueError(f"XLabs LoRAs cannot hold layer {name}: use random_lora(layers='xlabs')")
            if rest == "linear1":
                up = up[: 3 * lora.hidden]
            key = f"{block}.{index}.processor.{names[rest]}"
            state[f"{key}.down.weight"], state[f"{key}.up.weight"] = down, up * lora.scale
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}; known: {LORA_FORMATS}")
    return {k: v.contiguous() for k, v in state.items()}, metadata


@dataclass
class TinyLycoris:
    """LoKr (`kind="lokr"`: kron(w1, w2_a @ w2_b)) or LoHa (`kind="loha"`) factors per BFL-named layer."""

    kind: str
    layers: dict[str, dict[str, torch.Tensor]]
    alpha: float
    rank: int
    hidden: int

    def dense_deltas(self) -> dict[str, torch.Tensor]:
        scale = self.alpha / self.rank
        out = {}
        for name, f in self.layers.items():
            if self.kind == "lokr":
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"] if "lokr_w2_a" in f else f["lokr_w2"]
                out[name] = torch.kron(f["lokr_w1"], w2) * (scale if "lokr_w2_a" in f else 1.0)
            else:
                out[name] = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * scale
        return out


def random_lycoris(model, kind: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                   fused: bool = True) -> TinyLycoris:
    """LoKr/LoHa on double-block qkv/proj/mlp and single-block linear1/linear2 (LoKr qkv splits both on and off
    w2's row grid, and some LoKr layers with a dense w2); `fused=False` leaves out qkv and linear1."""
    shapes = {k: v for k, v in bfl_linear_shapes(model).items()
              if k.endswith(_ATTENTION_MLP) and (fused or not k.endswith(("qkv", "linear1")))}
    hidden = bfl_linear_shapes(model)["img_in"][0]
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (name, (out, inp)) in enumerate(sorted(shapes.items())):
        if kind == "lokr":
            out1 = (4, 6, 3)[i % 3] if out % 6 == 0 else 4  # 6 splits a 3h-row qkv on w2's grid, 4 does not
            in1 = 4
            w1 = torch.randn(out1, in1, generator=g) * 0.5
            o2, i2 = out // out1, inp // in1
            if i % 4 == 3:
                layers[name] = {"lokr_w1": w1, "lokr_w2": torch.randn(o2, i2, generator=g) * 0.02}
            else:
                layers[name] = {"lokr_w1": w1, "lokr_w2_a": torch.randn(o2, rank, generator=g) * 0.1,
                                "lokr_w2_b": torch.randn(rank, i2, generator=g) * 0.1}
        elif kind == "loha":
            layers[name] = {"hada_w1_a": torch.randn(out, rank, generator=g) * 0.3,
                            "hada_w1_b": torch.randn(rank, inp, generator=g) * 0.3,
                            "hada_w2_a": torch.randn(out, rank, generator=g) * 0.3,
                            "hada_w2_b": torch.randn(rank, inp, generator=g) * 0.3}
        else:
            raise ValueError(f"kind must be 'lokr' or 'loha', got {kind!r}")
    return TinyLycoris(kind, layers, alpha, rank, hidden)


def lycoris_state(lycoris: TinyLycoris, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya (`lora_unet_` + BFL names), bfl (`diffusion_model.` + BFL names) or simpletuner (`lycoris_` +
    diffusers names; fused layers are written as their dense per-module LoHa/LoKr parts where they split)."""
    state: dict[str, torch.Tensor] = {}
    for name, factors in lycoris.layers.items():
        if fmt == "kohya":
            keys = {"lora_unet_" + name.replace(".", "_"): factors}
        elif fmt == "bfl":
            keys = {"diffusion_model." + name: factors}
        elif fmt == "simpletuner":
            keys = {}
            for target, rows in to_diffusers_names(name, lycoris.hidden):
                split = _split_lycoris(lycoris.kind, factors, rows)
                if split is None:
                    raise ValueError(f"{name} cannot be split onto {target} as a {lycoris.kind}")
                keys["lycoris_" + target.replace(".", "_")] = split
        else:
            raise ValueError(f"unknown LyCORIS format {fmt!r}; known: {LYCORIS_FORMATS}")
        for key, f in keys.items():
            state.update({f"{key}.{role}": t for role, t in f.items()})
            state[f"{key}.alpha"] = _alpha_tensor(lycoris.alpha)
    return {k: v.contiguous() for k, v in state.items()}, {}


def _split_lycoris(kind: str, f: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor] | None:
    if isinstance(rows, slice) and rows == slice(None):
        return f
    if kind == "loha":
        return {**f, "hada_w1_a": _take(f["hada_w1_a"], rows), "hada_w2_a": _take(f["hada_w2_a"], rows)}
    out2 = (f["lokr_w2_a"] if "lokr_w2_a" in f else f["lokr_w2"]).shape[0]
    if rows == "swap" or rows.start % out2 or (rows.stop or 0) % out2:
        return None
    return {**f, "lokr_w1": f["lokr_w1"][rows.start // out2: (rows.stop // out2 if rows.stop else None)]}


def sdxl_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small LoRA in SDXL's kohya layout (UNet + both CLIP towers): the wrong architecture for FLUX.1."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_up_blocks_0_attentions_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"):
        state[key + ".lora_down.weight"] = torch.randn(4, 64, generator=g)
        state[key + ".lora_up.weight"] = torch.randn(64, 4, generator=g)
        state[key + ".alpha"] = _alpha_tensor(4.0)
    return state


def write_lora(path: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               dtype: torch.dtype | None = None) -> str:
    """Save a LoRA state dict as safetensors (optionally cast, e.g. to bf16 as trainers ship them)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and v.ndim else v for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt", **(metadata or {})})
    return path
