"""T5-XXL and CLIP-L from ComfyUI-format single files (configs inferred from shapes), tokenizers from local
folders, and the encoding FLUX.1 expects: T5 token embeddings + CLIP-L pooled output."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from . import files
from .dtypes import dequantize_scaled_fp8, is_fp8

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
T5_PREFIX_MARKERS = ("encoder.block.0.layer.0.SelfAttention.q.weight",)
CLIP_MARKER = "text_model.embeddings.token_embedding.weight"


def _strip_to(state: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor] | None:
    """Keys re-rooted so that `marker` is a top-level key; None when no key ends with it."""
    for key in state:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return None


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def t5_config(state: dict[str, torch.Tensor]):
    from transformers import T5Config

    rel = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    num_buckets, heads = rel.shape
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = "wi_0" if gated else "wi"
    d_ff, d_model = state[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"].shape
    vocab = state["shared.weight"].shape[0]
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=_count(state, r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=num_buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def clip_config(state: dict[str, torch.Tensor]):
    from transformers import CLIPTextConfig

    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    inter = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    # CLIP text towers use 64-wide heads (CLIP-L: 768 / 12); the head count is not stored in the weights.
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=_count(state, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _load_into(model_cls, config, state, path: str, dtype: torch.dtype, ignore: tuple[str, ...]):
    with torch.device("meta"):
        model = model_cls(config)
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith(ignore)}
    own_keys = model.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own_keys):  # transformers 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "encoder.embed_tokens.weight"]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit the inferred {model_cls.__name__}: missing {missing[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}"
        )
    if hasattr(model, "encoder") and hasattr(model, "shared"):
        model.encoder.embed_tokens = model.shared
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (position ids) are rebuilt on the CPU
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            module.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval().requires_grad_(False)


def _file_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return max(state.values(), key=lambda t: t.numel()).dtype


def load_t5(path: str, storage: torch.dtype | None, compute: torch.dtype):
    """T5 encoder from a ComfyUI-format file (t5xxl_fp16, t5xxl_fp8_e4m3fn[_scaled], ...)."""
    from transformers import T5EncoderModel

    state = dequantize_scaled_fp8(files.load_safetensors(path))
    rooted = _strip_to(state, T5_PREFIX_MARKERS[0])
    if rooted is None or "shared.weight" not in rooted:
        raise ValueError(
            f"{path} is not a T5 encoder: expected keys like 'encoder.block.0.layer.0.SelfAttention.q.weight' "
            "and 'shared.weight'"
        )
    file_dtype = _file_dtype(rooted)
    model = _load_into(T5EncoderModel, t5_config(rooted), rooted, path, compute, ())
    storage = storage or (file_dtype if is_fp8(file_dtype) else compute)
    if storage != compute:
        _layerwise_cast(model, storage, compute)
    return model


def load_clip_l(path: str, compute: torch.dtype):
    """CLIP-L text tower from a ComfyUI-format file (clip_l.safetensors)."""
    from transformers import CLIPTextModel

    state = dequantize_scaled_fp8(files.load_safetensors(path))
    rooted = _strip_to(state, CLIP_MARKER)
    if rooted is None:
        raise ValueError(f"{path} is not a CLIP text encoder: expected keys like '{CLIP_MARKER}'")
    return _load_into(
        CLIPTextModel, clip_config(rooted), rooted, path, compute,
        ("text_projection.weight", "position_ids", "logit_scale"),
    )


def _layerwise_cast(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """Keep the big matrices in `storage` (fp8) and upcast each layer as it runs; norms stay wide."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(
        model, storage_dtype=storage, compute_dtype=compute,
        skip_modules_pattern=("norm", "shared", "embed", "relative_attention_bias"),
    )


@dataclass
class Tokenizers:
    clip: object
    t5: object

    @classmethod
    def from_folders(cls, clip_dir: str, t5_dir: str) -> Tokenizers:
        from transformers import CLIPTokenizer, T5TokenizerFast

        return cls(CLIPTokenizer.from_pretrained(clip_dir), T5TokenizerFast.from_pretrained(t5_dir))


@dataclass
class Encoded:
    t5_embeds: torch.Tensor  # (1, L, D) float32
    clip_pooled: torch.Tensor  # (1, P) float32
    t5_dropped_tokens: int
    clip_dropped_tokens: int


def _tokenize(tokenizer, text: str, max_length: int) -> tuple[torch.Tensor, int]:
    ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = len(tokenizer(text, truncation=False)["input_ids"])
    return ids["input_ids"], max(0, full - max_length)


@torch.no_grad()
def encode(
    t5: torch.nn.Module,
    clip: torch.nn.Module,
    tokenizers: Tokenizers,
    prompt: str,
    clip_prompt: str | None,
    max_sequence_length: int,
    device: torch.device,
) -> Encoded:
    """FLUX.1 text conditioning as diffusers' FluxPipeline.encode_prompt computes it (no attention mask)."""
    clip_ids, clip_dropped = _tokenize(tokenizers.clip, prompt if clip_prompt is None else clip_prompt,
                                       CLIP_MAX_LENGTH)
    t5_ids, t5_dropped = _tokenize(tokenizers.t5, prompt, max_sequence_length)
    pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output
    embeds = t5(t5_ids.to(device), output_hidden_states=False)[0]
    return Encoded(embeds.float(), pooled.float(), t5_dropped, clip_dropped)
