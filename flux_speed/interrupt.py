"""Interrupt checks inside the transformer's blocks, so that ComfyUI's Cancel stops a sampling step within a
fraction of a second however large the step is.

Why a check per block is not enough (measured on 2 CPU cores with the embedded model, `bench/interrupt_gaps.py`,
docs/bench/interrupt_gaps_cpu_2026-12-01.json): the longest time between two per-block checks was 1.5 s at batch
256 of 128x128 (49k tokens) and 1.8 s at batch 1 of 2048x2048 (16.5k tokens) on an idle machine, 7.5 s at batch
256 with the machine loaded (load average 11; an earlier run of the script, not in the JSON). With 20 GiB free the memory check accepts batch 4428 of 128x128
(21 s per block, extrapolated) and 14368x14368 at batch 1 (about an hour per block: attention grows with the
square of the tokens). With the pieces below the longest gap was 0.06 s and 0.12 s idle (0.96 s loaded), and a
step took no longer (2.6 s against 3.6 s, 5.1 s against 5.0 s).

So a block whose work exceeds `work` multiply-adds runs in pieces, with the check before each piece:

- **batch chunks**: when one sample's work fits, the block's own forward (diffusers', or the compiled one) runs
  on as many samples at a time as fit. Every operation of a FLUX.1 block is per sample, so the result is the
  same up to float32 rounding (GEMMs over fewer rows may round differently).
- **token chunks**: when one sample's work alone exceeds `work` (long sequences), the block runs in three passes
  over its tokens: the queries, keys and values of every token, `work`-sized pieces at a time; attention for
  a range of queries at a time against all keys (query rows of attention are independent); then the output
  projection, gates, residuals and MLP of a range of tokens at a time. Every token goes through the same
  operations in the same order as in diffusers' `FluxTransformerBlock` / `FluxSingleTransformerBlock` forward
  and diffusers' `FluxAttnProcessor` (its projection helpers, rotary embedding and attention dispatch with the
  processor's backend are called), so float32 results are identical where the pieces are multiples of 256 rows
  (measured: CPU GEMMs and SDPA give the same bits for such pieces) and within float32 rounding otherwise
  (measured up to 1.8e-7 relative on the tiny test model, tests/speed/test_interrupt_chunks.py); peak
  memory also drops (the 4x-wide MLP activation exists one piece at a time). A mask passed as
  `joint_attention_kwargs["attention_mask"]` (regional prompts) is sliced with its queries.

diffusers has no chunked forward for FLUX.1 blocks (`enable_forward_chunking` covers other models' feed-forward
only), hence this code. Blocks of any other kind, attention processors other than diffusers' own, fused
projections or other joint-attention arguments run unchunked (one check per block, as before).

The work model counts the block's matmuls (12 x width^2 multiply-adds per token: q, k, v, output, 4x MLP) plus
ELEMENTWISE_WORK x width for its norms, modulation, rotary embedding and GELU (on the narrow embedded model these
take half of the block's time), and 2 x tokens x width per query for attention. `work_per_check` gives the CPU
default; on a GPU one block of the 12B model takes milliseconds at 1024x1024, so blocks stay whole there (a
chunk there would also only be queued, not run, when its check passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    dispatch_attention_fn,
)

HOOK_NAME = "fluxworks_block_check"
# Multiply-adds between two checks on the CPU: about 0.1 s of a 2-core CPU's float32 GEMM throughput, so a
# check comes every few tenths of a second even on a loaded machine (measured gaps: the JSON named above).
CPU_WORK_PER_CHECK = 2 * 10**9
ELEMENTWISE_WORK = 256  # multiply-add equivalents per residual element for the block's elementwise operations
ROW_ALIGN = 256  # pieces of a multiple of this many rows give bit-identical GEMM / SDPA results (measured)
# Attention pieces may hold this many times `work`: torch's CPU flash attention walks all keys once per block of
# 256 queries only when it is given at least 768 queries (64 below). At 2048x2048 (16.5k tokens, 2 cores) pieces of
# 236 queries took 4.8-6.4 s per transformer call against 4.2-5.8 s whole; pieces of 768 took 3.8 s against 3.9 s,
# with a check every 0.06 s at most.
ATTENTION_WORK_FACTOR = 4


@dataclass(frozen=True)
class InterruptCheck:
    """A cancel check that raises to stop (ComfyUI's), and how much work (multiply-adds) may run between two
    calls: None checks once per block only. `prepare` uses `work_per_check(device)` for a plain function."""

    check: Callable[[], None]
    work: int | None = CPU_WORK_PER_CHECK

    def __post_init__(self) -> None:
        if self.work is not None and self.work < 1:
            raise ValueError(f"work between interrupt checks must be at least 1 multiply-add, got {self.work}")

    def __call__(self) -> None:
        self.check()


def work_per_check(device: torch.device) -> int | None:
    """The default work between checks on `device`: CPU_WORK_PER_CHECK on the CPU, whole blocks elsewhere."""
    return CPU_WORK_PER_CHECK if device.type == "cpu" else None


def attach_interrupt_checks(transformer: torch.nn.Module, check: Callable[[], None], device: torch.device) -> None:
    """Register the check on every double and single block (registered first, so the innermost hook: the step
    cache and block offload hooks stay around it and see whole blocks)."""
    if not isinstance(check, InterruptCheck):
        check = InterruptCheck(check, work_per_check(device))
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_ChunkedBlock(check), HOOK_NAME)


def token_work(width: int) -> int:
    """Multiply-adds (and their elementwise equivalent) one token costs in one block, attention aside."""
    return width * (12 * width + ELEMENTWISE_WORK)


def _rows(total: int, work: int, per_row: int) -> int:
    """How many rows of `per_row` work a piece holds: a multiple of ROW_ALIGN when that fits, at least 1."""
    rows = max(1, work // max(1, per_row))
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return min(rows, total)


def _pieces(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _ChunkedBlock(ModelHook):
    def __init__(self, check: InterruptCheck) -> None:
        super().__init__()
        self.check = check

    def new_forward(self, module, *args, **kwargs):
        self.check()
        forward = self.fn_ref.original_forward
        if self.check.work is None or args or not _chunkable(module, kwargs):
            return forward(*args, **kwargs)
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        batch, width = hidden.shape[0], hidden.shape[-1]
        length = hidden.shape[1] + text.shape[1]
        per_sample = length * token_work(width) + 2 * length * length * width
        if batch * per_sample <= self.check.work:
            return forward(**kwargs)
        samples = self.check.work // per_sample
        text_out, hidden_out = torch.empty_like(text), torch.empty_like(hidden)
        for start, end in _pieces(batch, max(1, samples)):
            if start:
                self.check()
            piece = _batch_slice(kwargs, start, end, batch)
            if samples >= 1:
                text_out[start:end], hidden_out[start:end] = forward(**piece)
            elif isinstance(module, FluxTransformerBlock):
                text_out[start:end], hidden_out[start:end] = _double_in_pieces(module, self.check, **piece)
            else:
                text_out[start:end], hidden_out[start:end] = _single_in_pieces(module, self.check, **piece)
        return text_out, hidden_out


def _chunkable(block: torch.nn.Module, kwargs: dict) -> bool:
    """Whether `block` is a FLUX.1 block this module knows how to run in pieces with these arguments."""
    if not isinstance(block, (FluxTransformerBlock, FluxSingleTransformerBlock)):
        return False
    attn = block.attn
    extra = kwargs.get("joint_attention_kwargs") or {}
    rope = kwargs.get("image_rotary_emb")
    return (type(attn.processor) is FluxAttnProcessor and not getattr(attn, "fused_projections", False)
            and set(extra) <= {"attention_mask"} and isinstance(rope, tuple)
            and kwargs.get("hidden_states") is not None and kwargs.get("encoder_hidden_states") is not None)


def _batch_slice(kwargs: dict, start: int, end: int, batch: int) -> dict:
    piece = dict(kwargs)
    for name in ("hidden_states", "encoder_hidden_states", "temb"):
        piece[name] = kwargs[name][start:end]
    mask = (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask")
    if mask is not None and mask.shape[0] == batch and batch > 1:
        piece["joint_attention_kwargs"] = {**kwargs["joint_attention_kwargs"], "attention_mask": mask[start:end]}
    return piece


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


def _attention(attn, check: InterruptCheck, query, key, value, mask) -> torch.Tensor:
    """Attention of every query against all keys, a range of queries at a time; (1, L, heads x head_dim)."""
    length, width = query.shape[1], query.shape[2] * query.shape[3]
    out = query.new_empty(1, length, width)
    step = _rows(length, ATTENTION_WORK_FACTOR * check.work, 2 * key.shape[1] * width)
    processor = attn.processor
    for start, end in _pieces(length, step):
        check()
        rows = mask[..., start:end, :] if mask is not None else None
        piece = dispatch_attention_fn(query[:, start:end], key, value, attn_mask=rows,
                                      backend=processor._attention_backend,
                                      parallel_config=processor._parallel_config)
        out[:, start:end] = piece.flatten(2, 3).to(query.dtype)
    return out


def _project(attn, check, normed: Callable[[int, int], torch.Tensor], projections, norms, rope, offset: int,
             total: int, step: int, qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Fill rows offset..offset+total of (query, key, value) from `normed(start, end)` tokens, a piece at a time:
    projection, per-head RMS norm (query and key), rotary embedding (query and key), as diffusers' processor."""
    cos, sin = rope
    for start, end in _pieces(total, step):
        check()
        x = normed(start, end)
        rows = slice(offset + start, offset + end)
        freqs = (cos[rows], sin[rows])
        for i, (proj, target) in enumerate(zip(projections, qkv, strict=True)):
            y = _heads(attn, proj(x))
            if i < 2:
                y = apply_rotary_emb(norms[i](y), freqs, sequence_dim=1)
            target[:, rows] = y


def _qkv_buffers(text: torch.Tensor, hidden: torch.Tensor, attn) -> tuple[torch.Tensor, ...]:
    length = text.shape[1] + hidden.shape[1]
    shape = (1, length, attn.heads, attn.head_dim)
    return tuple(hidden.new_empty(shape) for _ in range(3))


def _sample_mask(joint_attention_kwargs: dict | None) -> torch.Tensor | None:
    return (joint_attention_kwargs or {}).get("attention_mask")


def _double_in_pieces(block, check: InterruptCheck, hidden_states, encoder_hidden_states, temb,
                      image_rotary_emb, joint_attention_kwargs=None):
    """diffusers' FluxTransformerBlock forward for one sample, a piece of tokens at a time (see module doc)."""
    attn, text, hidden = block.attn, encoder_hidden_states, hidden_states
    n_text, width = text.shape[1], hidden.shape[-1]
    step = _rows(max(text.shape[1], hidden.shape[1]), check.work, token_work(width))
    qkv = _qkv_buffers(text, hidden, attn)
    _project(attn, check, lambda s, e: block.norm1_context(text[:, s:e], emb=temb)[0],
             (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k),
             image_rotary_emb, 0, n_text, step, qkv)
    _project(attn, check, lambda s, e: block.norm1(hidden[:, s:e], emb=temb)[0],
             (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k), image_rotary_emb, n_text,
             hidden.shape[1], step, qkv)
    attended = _attention(attn, check, *qkv, _sample_mask(joint_attention_kwargs))
    del qkv
    # The modulation depends on the sample only: computed once from a one-token slice.
    _, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden[:, :1], emb=temb)
    _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text[:, :1], emb=temb)
    hidden_out, text_out = torch.empty_like(hidden), torch.empty_like(text)
    for start, end in _pieces(hidden.shape[1], step):
        check()
        a = attn.to_out[1](attn.to_out[0](attended[:, n_text + start:n_text + end]))
        h = hidden[:, start:end] + gate_msa.unsqueeze(1) * a
        n = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_out[:, start:end] = h + gate_mlp.unsqueeze(1) * block.ff(n)
    for start, end in _pieces(n_text, step):
        check()
        c = text[:, start:end] + c_gate_msa.unsqueeze(1) * attn.to_add_out(attended[:, start:end])
        n = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(n)
        text_out[:, start:end] = c.clip(-65504, 65504) if c.dtype == torch.float16 else c
    return text_out, hidden_out


def _single_in_pieces(block, check: InterruptCheck, hidden_states, encoder_hidden_states, temb,
                      image_rotary_emb, joint_attention_kwargs=None):
    """diffusers' FluxSingleTransformerBlock forward for one sample, a piece of tokens at a time."""
    attn, n_text = block.attn, encoder_hidden_states.shape[1]
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    length, width = joint.shape[1], joint.shape[-1]
    step = _rows(length, check.work, token_work(width))
    normed = torch.empty_like(joint)

    def norm(start: int, end: int) -> torch.Tensor:
        normed[:, start:end] = block.norm(joint[:, start:end], emb=temb)[0]
        return normed[:, start:end]

    qkv = _qkv_buffers(encoder_hidden_states, hidden_states, attn)
    _project(attn, check, norm, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k), image_rotary_emb,
             0, length, step, qkv)
    attended = _attention(attn, check, *qkv, _sample_mask(joint_attention_kwargs))
    del qkv
    _, gate = block.norm(joint[:, :1], emb=temb)
    out = torch.empty_like(joint)
    for start, end in _pieces(length, step):
        check()
        mlp = block.act_mlp(block.proj_mlp(normed[:, start:end]))
        y = joint[:, start:end] + gate.unsqueeze(1) * block.proj_out(torch.cat([attended[:, start:end], mlp], dim=2))
        out[:, start:end] = y.clip(-65504, 65504) if y.dtype == torch.float16 else y
    return out[:, :n_text], out[:, n_text:]
