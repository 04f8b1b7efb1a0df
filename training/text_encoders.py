"""Tiny T5 and CLIP-L text towers with the real tokenizers, trained jointly with the transformer, and their
export in ComfyUI's single-file layouts (`t5xxl_*.safetensors`, `clip_l.safetensors`).

The configs are exactly what `flux_models.text_encoders` infers from the saved shapes, so the model that
was trained is the model the loaders rebuild.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file

from fluxworks.flux_models.text_encoders import CLIP_HEADS_KEY, CLIP_MAX_LENGTH, Tokenizers

T5_WIDTH = 64
CLIP_WIDTH = 64  # CLIP text towers use 64-wide heads: one head at this width
T5_KEPT_TOKENS = 48  # captions need at most ~40 T5 tokens; the rest of a 128/256/512 sequence is padding
T5_VOCAB = 32128
CLIP_VOCAB = 49408
T5_SETTINGS = dict(d_model=T5_WIDTH, d_kv=32, d_ff=256, num_layers=3, num_heads=2)
CLIP_SETTINGS = dict(hidden_size=CLIP_WIDTH, intermediate_size=256, num_hidden_layers=2)


def build_text_encoders(seed: int):
    """(T5EncoderModel, CLIPTextModel), freshly initialised, in the configurations the loaders infer.

    Training uses eager attention: T5's learned position bias enters SDPA as a float mask that needs a
    gradient, a path on which CUDA's memory-efficient kernel failed with an illegal memory access here
    (pytorch/pytorch#148476 is one such case). The weights do not depend on the attention implementation.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, dropout_rate=0.0,
        attn_implementation="eager", **T5_SETTINGS))
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB, num_attention_heads=CLIP_WIDTH // 64, max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu", projection_dim=CLIP_WIDTH, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, attn_implementation="eager", **CLIP_SETTINGS))
    return t5, clip


def tokenize(tokenizers: Tokenizers, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(T5 ids (N, T5_KEPT_TOKENS), CLIP ids (N, 77)) tokenized as `FluxWorksTextEncode` tokenizes a prompt.

    Only the first `T5_KEPT_TOKENS` T5 columns are kept (the rest of a 128/256/512 sequence is padding).
    """
    pad = int(tokenizers.t5.pad_token_id)
    t5 = tokenizers.t5(captions, padding="max_length", max_length=T5_KEPT_TOKENS + 1, truncation=True,
                       return_tensors="np")["input_ids"]
    if (t5[:, -1] != pad).any():
        longest = captions[int(np.argmax((t5 != pad).sum(1)))]
        raise ValueError(f"caption longer than {T5_KEPT_TOKENS} T5 tokens: {longest!r}")
    clip = tokenizers.clip(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                           return_tensors="np")["input_ids"]
    return t5[:, :T5_KEPT_TOKENS].astype(np.int64), clip.astype(np.int64)


def tokenize_with(folders: tuple[str, str], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`tokenize` with tokenizers loaded from (CLIP folder, T5 folder): a picklable job for worker processes."""
    return tokenize(Tokenizers.from_folders(*folders), captions)


@dataclass
class CaptionTokens:
    """Token ids of many captions; T5 rows are padded back to 256 or 512 per batch."""

    t5: torch.Tensor  # (N, T5_KEPT_TOKENS) int64
    clip: torch.Tensor  # (N, 77) int64
    t5_pad: int

    @classmethod
    def from_arrays(cls, t5: np.ndarray, clip: np.ndarray, t5_pad: int) -> CaptionTokens:
        return cls(torch.from_numpy(t5), torch.from_numpy(clip), t5_pad)

    @classmethod
    def from_captions(cls, tokenizers: Tokenizers, captions: list[str]) -> CaptionTokens:
        return cls.from_arrays(*tokenize(tokenizers, captions), int(tokenizers.t5.pad_token_id))

    def __len__(self) -> int:
        return len(self.clip)

    def batch(self, index: torch.Tensor, t5_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 ids (B, t5_length), CLIP ids (B, 77)) for the captions at `index`."""
        t5 = self.t5[index]
        padding = torch.full((len(index), t5_length - t5.shape[1]), self.t5_pad, dtype=t5.dtype)
        return torch.cat([t5, padding], dim=1), self.clip[index]


def encode_text(t5, clip, t5_ids: torch.Tensor, clip_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 token embeddings (B, L, 64), CLIP pooled (B, 64)), computed as `flux_models.text_encoders.encode`."""
    return t5(t5_ids)[0], clip(clip_ids).pooler_output


def export_text_encoders(t5, clip, folder: str, t5_name: str, clip_name: str,
                         dtype: torch.dtype = torch.float16) -> tuple[str, str]:
    """ComfyUI layouts: T5 as `encoder.*` + `shared.weight`; CLIP under `text_model.*` + `text_projection`."""
    os.makedirs(folder, exist_ok=True)
    t5_state = {k: v.detach().to(dtype).contiguous() for k, v in t5.state_dict().items()
                if k != "encoder.embed_tokens.weight"}
    clip_state = {(k if k.startswith("text_model.") else "text_model." + k): v.detach().to(dtype).contiguous()
                  for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    clip_state["text_projection.weight"] = torch.eye(CLIP_WIDTH, dtype=dtype)  # unused by FLUX.1 (pooled only)
    t5_path, clip_path = os.path.join(folder, t5_name), os.path.join(folder, clip_name)
    save_file(t5_state, t5_path)
    # The tower is narrower than any released CLIP-L, so its head count must be stated for loaders to build it right.
    save_file(clip_state, clip_path, metadata={CLIP_HEADS_KEY: str(clip.config.num_attention_heads)})
    return t5_path, clip_path
