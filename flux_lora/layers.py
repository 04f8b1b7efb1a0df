"""Grouping a LoRA file's tensors by layer, and building the adapter each layer describes.

Key suffixes follow the trainers that write them: PEFT/diffusers (`lora_A/lora_B`), kohya and LyCORIS
(`lora_down/lora_up/alpha`, `lokr_*`, `hada_*`, `diff`), old diffusers attention processors (`_lora.down`,
`.lora.down`, `lora_linear_layer`), XLabs (`processor.qkv_lora1.down`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, Dense, Hadamard, Kronecker, LowRank

_SUFFIXES = {
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "up_bias",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".down.weight": "down", ".up.weight": "up",
    ".lora_magnitude_vector": "dora_scale", ".dora_scale": "dora_scale", ".alpha": "alpha",
    ".lokr_w1": "lokr_w1", ".lokr_w2": "lokr_w2", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2", ".diff": "diff", ".diff_b": "diff_b",
}
_BY_LENGTH = sorted(_SUFFIXES.items(), key=lambda item: -len(item[0]))


@dataclass
class LoraLayer:
    """The tensors one LoRA file stores for one layer, by role ("up", "down", "alpha", "lokr_w1", ...)."""

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        roles = set(self.tensors)
        if roles & {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"}:
            return "LoKr"
        if "hada_w1_a" in roles:
            return "LoHa"
        if roles & {"up", "down"}:
            return "LoRA"
        if roles & {"diff", "diff_b"}:
            return "diff"
        return "unknown"


def group_layers(state: dict[str, torch.Tensor]) -> tuple[dict[str, LoraLayer], list[str]]:
    """(layers by name, keys with no known LoRA suffix)."""
    layers: dict[str, LoraLayer] = {}
    stray: list[str] = []
    for key, value in state.items():
        for suffix, role in _BY_LENGTH:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                layer = layers.setdefault(name, LoraLayer(name))
                layer.tensors[role] = value
                layer.keys.append(key)
                break
        else:
            stray.append(key)
    return layers, stray


@dataclass(frozen=True)
class PeftScaling:
    """PEFT's `scaling = lora_alpha / r` (or / sqrt(r) with rsLoRA), with per-layer alpha/rank patterns, from a
    diffusers `lora_adapter_metadata` block or a PEFT `adapter_config.json`."""

    lora_alpha: float | None = None
    r: int | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_config(cls, config: dict) -> PeftScaling:
        return cls(config.get("lora_alpha"), config.get("r"), dict(config.get("alpha_pattern") or {}),
                   dict(config.get("rank_pattern") or {}), bool(config.get("use_rslora", False)))

    @staticmethod
    def _pattern_value(patterns: dict, name: str):
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
                return value
        return None

    def scale(self, name: str, rank: int) -> float:
        r = self._pattern_value(self.rank_pattern, name) or self.r or rank
        alpha = self._pattern_value(self.alpha_pattern, name) or self.lora_alpha
        if alpha is None:
            return 1.0
        return float(alpha) / (math.sqrt(r) if self.use_rslora else r)


class UnsupportedLayer(ValueError):
    """A layer this pack cannot apply (conv/Tucker factors, incomplete pairs); the message says why."""


def _alpha(layer: LoraLayer) -> float | None:
    alpha = layer.tensors.get("alpha")
    return None if alpha is None else float(alpha.float().reshape(-1)[0])


def build_adapters(layer: LoraLayer, peft: PeftScaling | None, peft_name: str) -> dict[str, Adapter]:
    """{"weight": adapter, "bias": adapter} for one layer; raises UnsupportedLayer with the reason."""
    t = layer.tensors
    for role in ("mid", "lokr_t2", "hada_t1", "hada_t2"):
        if role in t:
            raise UnsupportedLayer(f"'{role}' (Tucker/conv factors) only occurs in conv layers, which FLUX.1 lacks")
    alpha = _alpha(layer)
    kind = layer.kind
    out: dict[str, Adapter] = {}
    if kind == "LoRA":
        if "up" not in t or "down" not in t:
            raise UnsupportedLayer("an up/lora_B matrix without its down/lora_A partner (or the reverse)")
        up, down = t["up"].flatten(1), t["down"].flatten(1)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise UnsupportedLayer(f"up {tuple(up.shape)} and down {tuple(down.shape)} have different ranks")
        if alpha is not None:
            scale = alpha / rank
        elif peft is not None:
            scale = peft.scale(peft_name, rank)
        else:
            scale = 1.0
        out["weight"] = LowRank(up, down, scale)
        if "up_bias" in t:
            out["bias"] = Dense(t["up_bias"], scale)
    elif kind == "LoKr":
        w1 = t.get("lokr_w1")
        dim = None
        if w1 is None:
            if "lokr_w1_a" not in t or "lokr_w1_b" not in t:
                raise UnsupportedLayer("LoKr layer without lokr_w1 or its factors lokr_w1_a/lokr_w1_b")
            w1, dim = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float(), t["lokr_w1_b"].shape[0]
        w2, w2_a, w2_b = t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b")
        if w2 is None:
            if w2_a is None or w2_b is None:
                raise UnsupportedLayer("LoKr layer without lokr_w2 or its factors lokr_w2_a/lokr_w2_b")
            dim = w2_b.shape[0]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        out["weight"] = Kronecker(w1, w2, w2_a, w2_b, scale)
    elif kind == "LoHa":
        missing = [r for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if r not in t]
        if missing:
            raise UnsupportedLayer(f"LoHa layer without {', '.join(missing)}")
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        out["weight"] = Hadamard(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], scale)
    elif kind == "diff":
        if "diff" in t:
            out["weight"] = Dense(t["diff"])
        if "diff_b" in t:
            out["bias"] = Dense(t["diff_b"])
    else:
        raise UnsupportedLayer(f"no recognised LoRA tensors (found roles {sorted(t)})")
    return out
