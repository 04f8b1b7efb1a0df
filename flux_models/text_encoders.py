"""T5-XXL and CLIP-L from ComfyUI-format single files (configs inferred from shapes), tokenizers from local
folders, and the encoding FLUX.1 expects: T5 token embeddings + CLIP-L pooled output."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from . import files
from .dtypes import dequantize_scaled_fp8, is_fp8

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
# A CLIP text tower's keys below its root: ComfyUI and transformers 4 files put them under `text_model.`,
# transformers 5's CLIPTextModel saves them at the top level.
CLIP_TOKEN_MARKER = "embeddings.token_embedding.weight"
CLIP_LAYER_MARKER = "encoder.layers.0.self_attn.q_proj.weight"
TEXT_MODEL_PREFIX = "text_model."
# Metadata key of a CLIP file stating its attention head count (the weights do not say it); a transformers
# `config.json` beside the file (a `save_pretrained` folder) is read as well.
CLIP_HEADS_KEY = "fluxworks.num_attention_heads"
# Every released CLIP text tower uses 64-wide heads (OpenAI ViT-B 512/8, ViT-L 768/12; OpenCLIP ViT-H 1024/16,
# ViT-bigG 1280/20): for these widths the head count is known without being stated.
RELEASED_CLIP_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}
T5 = "t5"
CLIP_L = "clip_l"


def _root(keys: Iterable[str], marker: str, companion: str | None = None) -> str | None:
    """The prefix under which `marker` (and `companion`, if given) sit in `keys`; None when no key ends with it."""
    keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    for key in keys:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            if companion is None or prefix + companion in keys:
                return prefix
    return None


def t5_root(keys: Iterable[str]) -> str | None:
    return _root(keys, T5_MARKER)


def clip_root(keys: Iterable[str]) -> str | None:
    """The prefix of a CLIP text tower's `embeddings.*` / `encoder.*` keys, in either layout."""
    return _root(keys, CLIP_TOKEN_MARKER, CLIP_LAYER_MARKER)


def text_encoder_kinds(keys: Iterable[str]) -> frozenset[str]:
    """Which FLUX.1 text encoders (T5, CLIP_L) a file's keys hold: usually one, both for a merged file."""
    keys = set(keys)
    kinds = set()
    if t5_root(keys) is not None:
        kinds.add(T5)
    if clip_root(keys) is not None:
        kinds.add(CLIP_L)
    return frozenset(kinds)


def describe_keys(keys: Iterable[str]) -> str:
    """What a file that is not the text encoder asked for seems to hold, from its key names."""
    keys = list(keys)
    kinds = text_encoder_kinds(keys)
    if kinds == {T5}:
        return "it looks like a T5 text encoder"
    if kinds == {CLIP_L}:
        return "it looks like a CLIP text encoder"
    joined = " ".join(keys[:2000])
    for needle, what in (("lora_", "a LoRA (it belongs in models/loras)"),
                         ("controlnet_", "a ControlNet (it belongs in models/controlnet)"),
                         ("double_blocks.", "a FLUX.1 transformer (it belongs in models/diffusion_models)"),
                         ("transformer_blocks.", "a diffusion transformer (it belongs in models/diffusion_models)"),
                         ("taesd_decoder", "a tiny VAE (it belongs in models/vae)"),
                         ("decoder.conv_in", "a VAE (it belongs in models/vae)"),
                         ("vision_model.", "a CLIP vision model (it belongs in models/clip_vision)")):
        if needle in joined:
            return f"it looks like {what}"
    return "its first keys are " + ", ".join(keys[:4])


# The sizes FLUX.1 was trained with (key under the encoder's root, width): T5-XXL's d_model 4096, CLIP-L's 768.
# Pickers list files of these sizes first, so the default is a working one when a folder also holds e.g. CLIP-G.
FLUX_WIDTHS = {T5: ("shared.weight", 4096), CLIP_L: (CLIP_TOKEN_MARKER, 768)}


@dataclass(frozen=True)
class TextEncoderFile:
    """What a file in the text-encoder folders holds, from its header."""

    kinds: frozenset[str]  # T5 and/or CLIP_L; empty for anything else
    flux_sized: frozenset[str]  # those of `kinds` at FLUX.1's own width (see FLUX_WIDTHS)


NOT_A_TEXT_ENCODER = TextEncoderFile(frozenset(), frozenset())


def describe_text_encoder_header(header: files.Header) -> TextEncoderFile:
    kinds = text_encoder_kinds(header.keys)
    sized = set()
    for kind in kinds:
        root = t5_root(header.keys) if kind == T5 else clip_root(header.keys)
        key, width = FLUX_WIDTHS[kind]
        shape = header.shapes.get(root + key, ())
        if shape and shape[-1] == width:
            sized.add(kind)
    return TextEncoderFile(kinds, frozenset(sized))


@functools.lru_cache(maxsize=1024)
def _text_encoder_file(path: str, size: int, mtime_ns: int) -> TextEncoderFile:
    """Cached per version of the file (size, mtime), which also makes the log line below appear once."""
    try:
        header = files.read_header(path)
    except (ValueError, OSError) as exc:
        logger.warning("FluxWorks text-encoder pickers leave out %s: %s", path, exc)
        return NOT_A_TEXT_ENCODER
    found = describe_text_encoder_header(header)
    if not found.kinds:
        logger.warning("FluxWorks text-encoder pickers leave out %s: it is neither a T5 nor a CLIP-L text encoder; "
                       "%s", path, describe_keys(header.keys))
    return found


def text_encoder_file(path: str) -> TextEncoderFile:
    """What a file holds, from its header only (see `text_encoder_kinds`); nothing for files that are
    unreadable, not safetensors, or something else (each logged once, with the reason)."""
    if not path.endswith(files.WEIGHT_SUFFIXES):
        return _not_safetensors(path)
    try:
        stat = os.stat(path)
    except OSError as exc:
        logger.warning("FluxWorks text-encoder pickers leave out %s: %s", path, exc)
        return NOT_A_TEXT_ENCODER
    return _text_encoder_file(path, stat.st_size, stat.st_mtime_ns)


def file_text_encoder_kinds(path: str) -> frozenset[str]:
    return text_encoder_file(path).kinds


@functools.lru_cache(maxsize=1024)
def _not_safetensors(path: str) -> TextEncoderFile:
    logger.warning("FluxWorks text-encoder pickers leave out %s: only .safetensors files are loaded (pickled "
                   ".ckpt/.pt/.bin files can run code when loaded)", path)
    return NOT_A_TEXT_ENCODER


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


def stated_clip_config(path: str, metadata: dict[str, str] | None = None) -> tuple[dict, str] | None:
    """(settings, where they were read) when the file states its CLIP text config: the `CLIP_HEADS_KEY`
    metadata entry, or a transformers `config.json` beside it (`save_pretrained` writes one; a full CLIP's
    config holds the text tower's under `text_config`). None when neither says anything."""
    if metadata and CLIP_HEADS_KEY in metadata:
        value = metadata[CLIP_HEADS_KEY]
        try:
            heads = int(value)
        except ValueError as exc:
            raise ValueError(f"{path}: metadata {CLIP_HEADS_KEY}={value!r} is not a whole number of attention "
                             "heads") from exc
        return {"num_attention_heads": heads}, f"its metadata ({CLIP_HEADS_KEY})"
    config_path = os.path.join(os.path.dirname(path), "config.json")
    if not os.path.isfile(config_path):
        return None
    config = files.read_json(config_path)
    if config.get("model_type") == "clip" and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if config.get("model_type") not in ("clip_text_model", None) or "num_attention_heads" not in config:
        return None  # a config.json of something else in the same folder says nothing about this file
    keep = ("num_attention_heads", "hidden_size", "hidden_act", "layer_norm_eps")
    return {k: config[k] for k in keep if k in config}, config_path


def clip_heads(hidden: int, path: str, stated: tuple[dict, str] | None) -> int:
    """The attention head count of a CLIP text tower of width `hidden`: stated by the file (see
    `stated_clip_config`), known for released widths, else assumed 64-wide with a warning. The weights cannot
    tell it (q/k/v are hidden x hidden whatever the split), and a wrong count changes every output."""
    if stated is not None:
        settings, where = stated
        heads = settings["num_attention_heads"]
        if "hidden_size" in settings and settings["hidden_size"] != hidden:
            raise ValueError(f"{path}: {where} gives hidden_size {settings['hidden_size']}, but the weights are "
                             f"{hidden} wide: that config belongs to another model; remove it or fix it")
        if not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"{path}: {where} gives num_attention_heads {heads!r}, which does not divide the "
                             f"width {hidden}: fix it to the model's head count")
        return heads
    if hidden in RELEASED_CLIP_HEADS:
        return RELEASED_CLIP_HEADS[hidden]
    if hidden % 64:
        raise ValueError(f"{path}: a CLIP text tower {hidden} wide cannot use the usual 64-wide heads, and the "
                         f"file does not say its head count: put its transformers config.json beside it, or set "
                         f"the safetensors metadata {CLIP_HEADS_KEY}")
    heads = hidden // 64
    logger.warning("%s: CLIP text tower %d wide is not a released CLIP's and the file does not say its head count; "
                   "assuming %d attention head(s) of width 64. If its model used another count, its outputs will be "
                   "wrong: put its transformers config.json beside it or set the safetensors metadata %s", path,
                   hidden, heads, CLIP_HEADS_KEY)
    return heads


def clip_config(state: dict[str, torch.Tensor], path: str = "CLIP text encoder",
                stated: tuple[dict, str] | None = None):
    """CLIPTextConfig of a text tower whose keys are rooted at `embeddings.*` / `encoder.*`."""
    from transformers import CLIPTextConfig

    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    positions = state["embeddings.position_embedding.weight"].shape[0]
    inter = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    settings = stated[0] if stated is not None else {}
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=_count(state, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=clip_heads(hidden, path, stated),
        max_position_embeddings=positions,
        hidden_act=settings.get("hidden_act", "quick_gelu"),
        layer_norm_eps=settings.get("layer_norm_eps", 1e-5),
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _load_into(model_cls, config, state, path: str, dtype: torch.dtype, ignore: tuple[str, ...],
               nest_under: str = ""):
    """`model_cls(config)` holding `state`; keys get `nest_under` in front when this transformers nests the
    model's weights there (transformers 4's CLIPTextModel: `text_model.`; version 5 does not)."""
    with torch.device("meta"):
        model = model_cls(config)
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith(ignore)}
    if nest_under and any(k.startswith(nest_under) for k in model.state_dict()):
        state = {nest_under + k: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches: torch names the key, not the file
        raise ValueError(f"{path}: weights do not fit the {model_cls.__name__} inferred from its shapes: {exc}") \
            from exc
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
    root = t5_root(state)
    if root is None or root + "shared.weight" not in state:
        raise ValueError(
            f"{path} is not a T5 encoder: expected keys like '{T5_MARKER}' and 'shared.weight'; "
            f"{describe_keys(state)}. Pick a t5xxl_*.safetensors file as t5_name"
        )
    rooted = {k[len(root):]: v for k, v in state.items() if k.startswith(root)}
    file_dtype = _file_dtype(rooted)
    model = _load_into(T5EncoderModel, t5_config(rooted), rooted, path, compute, ())
    storage = storage or (file_dtype if is_fp8(file_dtype) else compute)
    if storage != compute:
        _layerwise_cast(model, storage, compute)
    return model


def load_clip_l(path: str, compute: torch.dtype):
    """CLIP-L text tower from a ComfyUI-format file (clip_l.safetensors, keys under `text_model.`) or one saved
    by transformers 5 (keys at the top level); the head count as `clip_heads` finds it."""
    from transformers import CLIPTextModel

    state = dequantize_scaled_fp8(files.load_safetensors(path))
    root = clip_root(state)
    if root is None:
        raise ValueError(
            f"{path} is not a CLIP text encoder: expected keys like '{TEXT_MODEL_PREFIX}{CLIP_TOKEN_MARKER}' "
            f"(ComfyUI, transformers 4) or '{CLIP_TOKEN_MARKER}' (transformers 5); {describe_keys(state)}. "
            "Pick a clip_l.safetensors file as clip_name"
        )
    tower = {k[len(root):]: v for k, v in state.items() if k.startswith(root)}
    stated = stated_clip_config(path, files.read_header(path).metadata)
    return _load_into(
        CLIPTextModel, clip_config(tower, path, stated), tower, path, compute,
        ("text_projection.weight", "position_ids", "logit_scale"), nest_under=TEXT_MODEL_PREFIX,
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


def check_text(name: str, text: str) -> None:
    """Refuse text the tokenizers cannot take, naming where it breaks: a lone UTF-16 surrogate (half of an emoji,
    e.g. from a JSON `\\ud83d` escape or a copy cut mid-character) is not valid Unicode text, and the fast
    tokenizers fail on it with a bare TypeError."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        context = text[max(0, exc.start - 20):exc.start].encode("utf-8", "replace").decode("utf-8")
        raise ValueError(f"{name} holds a lone UTF-16 surrogate U+{ord(bad):04X} at character {exc.start} (after "
                         f"{context!r}): half of a character such as an emoji, cut by a copy or an escaped JSON "
                         "string; delete it or paste the whole character again") from exc


def _tokenize(tokenizer, text: str, max_length: int) -> tuple[torch.Tensor, int]:
    ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = len(tokenizer(text, truncation=False)["input_ids"])
    return ids["input_ids"], max(0, full - max_length)


def _encoder_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The pieces an interrupt check runs before: T5's attention and feed-forward sublayers (T5EncoderModel),
    CLIP's layers (CLIPTextModel)."""
    encoder = getattr(model, "text_model", model).encoder  # transformers 4 nests CLIP's under text_model
    if hasattr(encoder, "block"):
        return [sub for block in encoder.block for sub in block.layer]
    return list(encoder.layers)


@contextlib.contextmanager
def _checked(models: Iterable[torch.nn.Module], interrupt: Callable[[], None] | None) -> Iterator[None]:
    """Call `interrupt` (which raises to stop) before each layer of `models` while inside; the hooks are removed on
    exit, so the models are left as they were. T5-XXL on a CPU spends seconds per layer at 512 tokens (about 100
    GMAC per layer: 34 in attention, 64 in the gated feed-forward), 24 layers in all, so a check per sublayer bounds
    a Cancel during the encode by one sublayer's time (one to three seconds there, by that count)."""
    if interrupt is None:
        yield
        return
    handles = [unit.register_forward_pre_hook(lambda *_: interrupt()) for model in models
               for unit in _encoder_units(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def encode(
    t5: torch.nn.Module,
    clip: torch.nn.Module,
    tokenizers: Tokenizers,
    prompt: str,
    clip_prompt: str | None,
    max_sequence_length: int,
    device: torch.device,
    interrupt: Callable[[], None] | None = None,
) -> Encoded:
    """FLUX.1 text conditioning as diffusers' FluxPipeline.encode_prompt computes it (no attention mask).
    `interrupt` (the host's cancel check) runs before every encoder layer (see `_checked`)."""
    check_text("prompt", prompt)
    if clip_prompt is not None:
        check_text("clip_prompt", clip_prompt)
    clip_ids, clip_dropped = _tokenize(tokenizers.clip, prompt if clip_prompt is None else clip_prompt,
                                       CLIP_MAX_LENGTH)
    t5_ids, t5_dropped = _tokenize(tokenizers.t5, prompt, max_sequence_length)
    with _checked((clip, t5), interrupt):
        pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        embeds = t5(t5_ids.to(device), output_hidden_states=False)[0]
    return Encoded(embeds.float(), pooled.float(), t5_dropped, clip_dropped)
