"""Regional prompts by joint-attention mask: each region's prompt reaches only its own image tokens.

All regional T5 sequences follow the global prompt in one text stream, `[global | region 1 | ... | region R]`,
and one boolean mask over the joint sequence `[text | image]` says who may attend to whom (InstantX's regional
FLUX, arXiv 2411.02395; InvokeAI's "restricted" regional extension):

- image <-> image: always open (isolating regions' image tokens from each other draws separate pictures,
  InvokeAI PR #8718);
- region r's text <-> region r's image tokens, and region r's text <-> itself;
- region text never sees other regions' text nor the global text (and is not seen by them);
- global text <-> itself and the background image tokens (those no region covers); image tokens inside a region
  see only their region(s)' text, so a region covering the whole image with the global prompt's text gives
  exactly the unmasked result (the parity test);
- a token covered by several regions sees all of their texts.

Every query row keeps itself, so no softmax row is empty (no NaN). A region's `strength` other than 1 adds
ln(strength) to the scores its image tokens give its text (additive float mask instead of boolean).

Masks are resized to the packed token grid (one token per 16x16 pixels) by area averaging and thresholded at
0.5. The mask is applied only on the positive pass (true CFG's negative pass is unmasked, InvokeAI's FLUX.2
extension does the same), only inside a window of sampling progress and only on a chosen set of blocks; the
block choice needs `attach_mask_router` on the transformer (a prepared clone), which keeps diffusers' own
`FluxAttnProcessor` and passes the mask as its `attention_mask`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from .progress import StepPosition
from .sampling import TextConditioning

logger = logging.getLogger(__name__)

# joint_attention_kwargs key naming the blocks that get the mask; the router hook takes it out before diffusers'
# forward hands joint_attention_kwargs to the blocks.
MASK_BLOCKS_KEY = "fluxworks_mask_blocks"
ROUTER_HOOK = "fluxworks_regional_router"
BLOCK_HOOK = "fluxworks_regional_mask"
TOKEN_PIXELS = 16  # one packed token = 2x2 latent cells = 16x16 pixels
# diffusers attention backends that take an arbitrary attention mask. Any other (flash, cuDNN, sage ...) is
# swapped for "native" SDPA on the masked calls only.
MASK_BACKENDS = frozenset({None, "native", "_native_efficient", "_native_math", "flex"})
BLOCK_SETS = ("all", "double", "single", "even", "odd")


@dataclass(frozen=True)
class RegionalSettings:
    """Where the mask applies: progress window [start_percent, end_percent] of the sampling steps, and the
    blocks ("all", "double", "single", "even" or "odd" positions in the double-then-single order, or an
    explicit tuple of block indices in that order)."""

    start_percent: float = 0.0
    end_percent: float = 1.0
    blocks: str | tuple[int, ...] = "all"

    def __post_init__(self) -> None:
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"regional {name} must be within [0, 1], got {value}")
        if self.start_percent > self.end_percent:
            raise ValueError(f"regional start_percent ({self.start_percent}) exceeds end_percent "
                             f"({self.end_percent})")
        if isinstance(self.blocks, str) and self.blocks not in BLOCK_SETS:
            raise ValueError(f"regional blocks must be one of {BLOCK_SETS} or a list of block indices, "
                             f"got {self.blocks!r}")

    def block_indices(self, double: int, single: int) -> frozenset[int]:
        """Indices into the double-then-single block order that get the mask."""
        total = double + single
        if not isinstance(self.blocks, str):
            bad = [i for i in self.blocks if not 0 <= i < total]
            if bad:
                raise ValueError(f"regional blocks {bad} do not exist: the model has {double} double and {single} "
                                 f"single blocks (indices 0..{total - 1})")
            return frozenset(self.blocks)
        chosen = {"all": range(total), "double": range(double), "single": range(double, total),
                  "even": range(0, total, 2), "odd": range(1, total, 2)}[self.blocks]
        return frozenset(chosen)


def token_masks(masks: torch.Tensor, token_h: int, token_w: int) -> torch.Tensor:
    """(R, H, W) masks in [0, 1] at any resolution -> (R, token_h * token_w) bool in packed-token order
    (row-major, as `latents.pack`): the area average over each token's pixels, above one half."""
    if masks.ndim != 3:
        raise ValueError(f"region masks must be (regions, height, width), got shape {tuple(masks.shape)}")
    resized = F.interpolate(masks[:, None].float(), size=(token_h, token_w), mode="area")[:, 0]
    return (resized > 0.5).reshape(masks.shape[0], token_h * token_w)


def joint_mask(global_length: int, region_lengths: list[int] | tuple[int, ...], region_tokens: torch.Tensor,
               strengths: list[float] | tuple[float, ...] | None = None) -> torch.Tensor:
    """The (L, L) attention mask over `[global text | region texts | image tokens]`, L = text + image tokens:
    bool (True = may attend) when every strength is 1, else float (0 / -inf, plus ln(strength) where region r's
    image tokens look at region r's text). `region_tokens` is (R, N) bool: which image tokens each region covers.
    The rules are in the module docstring."""
    regions, image = region_tokens.shape
    if len(region_lengths) != regions:
        raise ValueError(f"{len(region_lengths)} region texts but {regions} region masks")
    strengths = tuple(strengths) if strengths is not None else (1.0,) * regions
    text = global_length + sum(region_lengths)
    length = text + image
    device = region_tokens.device
    allowed = torch.zeros(length, length, dtype=torch.bool, device=device)
    allowed[text:, text:] = True  # image <-> image
    g = slice(0, global_length)
    allowed[g, g] = True
    background = ~region_tokens.any(0)  # (N,)
    allowed[g, text:] |= background[None, :]
    allowed[text:, g] |= background[:, None]
    bias = torch.zeros(length, length, device=device) if any(s != 1.0 for s in strengths) else None
    start = global_length
    for r, size in enumerate(region_lengths):
        t = slice(start, start + size)
        covered = region_tokens[r]
        allowed[t, t] = True
        allowed[t, text:] |= covered[None, :]
        allowed[text:, t] |= covered[:, None]
        if bias is not None and strengths[r] != 1.0:
            bias[text:, t] += torch.where(covered, math.log(strengths[r]), 0.0)[:, None]
        start += size
    if bias is None:
        return allowed
    return bias.masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class RegionalConditioning(TextConditioning):
    """A global prompt plus regional prompts, as one text stream for the transformer.

    `embeds` is `[global | region 1 | ... | region R]` (B, L, D) and `pooled` the global prompt's pooled CLIP
    vector; `global_length` and `region_lengths` split the stream, `masks` (R, H, W) in [0, 1] (any
    resolution, resized to the token grid) say where each region is, `strengths` weigh each region's text."""

    global_length: int = 0
    region_lengths: tuple[int, ...] = ()
    masks: torch.Tensor | None = None
    strengths: tuple[float, ...] = ()
    settings: RegionalSettings = RegionalSettings()

    @classmethod
    def build(cls, base: TextConditioning, regions: list[tuple[TextConditioning, torch.Tensor, float]],
              settings: RegionalSettings | None = None) -> RegionalConditioning:
        """From the global prompt and (prompt, mask (H, W), strength) rows; masks must share one size."""
        if not regions:
            raise ValueError("a regional conditioning needs at least one (prompt, mask) region")
        shape = regions[0][1].shape
        for i, (cond, mask, strength) in enumerate(regions):
            if mask.shape != shape:
                raise ValueError(f"region {i + 1}'s mask is {tuple(mask.shape)} but region 1's is {tuple(shape)}: "
                                 "resize them to one size first")
            if cond.embeds.shape[-1] != base.embeds.shape[-1]:
                raise ValueError(f"region {i + 1}'s prompt has T5 width {cond.embeds.shape[-1]} but the global "
                                 f"prompt has {base.embeds.shape[-1]}: encode both with the same text encoders")
            if not (math.isfinite(strength) and strength > 0):
                raise ValueError(f"region {i + 1} has strength {strength}; use a finite value above 0")
        batch = max([base.embeds.shape[0]] + [c.embeds.shape[0] for c, _, _ in regions])
        parts = [base.for_batch(batch).embeds] + [c.for_batch(batch).embeds.to(base.embeds) for c, _, _ in regions]
        masks = torch.stack([m.float().clamp(0, 1) for _, m, _ in regions])
        return cls(torch.cat(parts, dim=1), base.for_batch(batch).pooled, base.embeds.shape[1],
                   tuple(c.embeds.shape[1] for c, _, _ in regions), masks, tuple(float(s) for _, _, s in regions),
                   settings or RegionalSettings())

    def for_batch(self, batch: int) -> RegionalConditioning:
        plain = TextConditioning.for_batch(self, batch)
        return dataclasses.replace(self, embeds=plain.embeds, pooled=plain.pooled)

    @property
    def base(self) -> TextConditioning:
        """The global prompt alone (what ControlNets see)."""
        return TextConditioning(self.embeds[:, : self.global_length], self.pooled)

    def region_tokens(self, latent_h: int, latent_w: int) -> torch.Tensor:
        """(R, N) bool: the image tokens of a (latent_h, latent_w) latent each region covers; a region that covers
        none at this size raises ValueError naming it."""
        tokens = token_masks(self.masks, latent_h // 2, latent_w // 2)
        empty = [i + 1 for i in range(tokens.shape[0]) if not tokens[i].any()]
        if empty:
            raise ValueError(f"region(s) {empty} cover no {TOKEN_PIXELS}x{TOKEN_PIXELS}-pixel token of the "
                             f"{latent_w * 8}x{latent_h * 8} image (a token counts when over half of it is inside "
                             "the mask): draw them larger or remove them")
        return tokens

    def attention_mask(self, latent_h: int, latent_w: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """The (1, 1, L, L) joint mask for this latent size, bool or `dtype` additive."""
        mask = joint_mask(self.global_length, self.region_lengths, self.region_tokens(latent_h, latent_w).to(device),
                          self.strengths)
        return (mask if mask.dtype == torch.bool else mask.to(dtype))[None, None]

    def joint_attention_kwargs(self, transformer: torch.nn.Module, position: StepPosition, latent_h: int,
                               latent_w: int, dtype: torch.dtype) -> dict | None:
        """diffusers `joint_attention_kwargs` for a positive-pass call at `position`: the joint mask and the
        blocks it applies to, or None outside the window."""
        if not position.within(self.settings.start_percent, self.settings.end_percent):
            return None
        if ROUTER_HOOK not in _hook_names(transformer):
            raise RuntimeError("regional prompts need the mask router on the transformer (attach_mask_router); "
                               "sample through flux_speed.prepare.sample_prepared")
        device = next(transformer.parameters()).device
        blocks = self.settings.block_indices(len(transformer.transformer_blocks),
                                             len(transformer.single_transformer_blocks))
        return {"attention_mask": self.attention_mask(latent_h, latent_w, device, dtype), MASK_BLOCKS_KEY: blocks}


def _hook_names(module: torch.nn.Module) -> set[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return set(registry.hooks) if registry is not None else set()


class _RouterState:
    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.blocks: frozenset[int] = frozenset()


class _Router(ModelHook):
    """On the transformer: takes the mask and the block set out of joint_attention_kwargs for this call."""

    def __init__(self, state: _RouterState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        extra = kwargs.get("joint_attention_kwargs")
        if extra and MASK_BLOCKS_KEY in extra:
            extra = dict(extra)
            self.state.blocks = extra.pop(MASK_BLOCKS_KEY)
            self.state.mask = extra.pop("attention_mask")
            kwargs["joint_attention_kwargs"] = extra or None
        else:
            self.state.mask, self.state.blocks = None, frozenset()
        return args, kwargs


class _BlockMask(ModelHook):
    """On one block: hands it the mask when the block is chosen, on a backend that takes masks."""

    def __init__(self, state: _RouterState, index: int) -> None:
        super().__init__()
        self.state, self.index = state, index
        self.saved_backend: list = []

    def pre_forward(self, module, *args, **kwargs):
        if self.state.mask is None or self.index not in self.state.blocks:
            return args, kwargs
        kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}),
                                            "attention_mask": self.state.mask}
        processor = module.attn.processor
        backend = getattr(processor, "_attention_backend", None)
        if backend not in MASK_BACKENDS:
            self.saved_backend.append(backend)
            processor._attention_backend = "native"
        return args, kwargs

    def post_forward(self, module, output):
        if self.saved_backend:
            module.attn.processor._attention_backend = self.saved_backend.pop()
        return output


def attach_mask_router(transformer: torch.nn.Module) -> None:
    """Register the router on `transformer` (a prepared clone, never the loaded model) and a mask hook on every
    double and single block, so `RegionalConditioning.joint_attention_kwargs` reaches only the chosen blocks."""
    if ROUTER_HOOK in _hook_names(transformer):
        return
    state = _RouterState()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_Router(state), ROUTER_HOOK)
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for index, block in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockMask(state, index), BLOCK_HOOK)
