"""FluxWorksRegionalPrompt, and how FluxWorksSampler reads regions that core nodes put on a CONDITIONING.

A CONDITIONING with regions is core's own layout, so core samplers read it too: a list of [T5 tokens, extras]
entries, the global prompt without a mask or area, each region with core's keys: `mask` (+ `mask_strength`,
`set_area_to_bounds`) from ConditioningSetMask, or `area` (latent units, or `("percentage", h, w, y, x)`) +
`strength` from ConditioningSetArea / ConditioningSetAreaPercentage, joined by ConditioningCombine. FluxWorks
Sampler turns them into one joint-attention mask (flux_sampler/regional.py) instead of core's blend of one forward
pass per region:
- `strength` (ConditioningSetArea*) times `mask_strength` (ConditioningSetMask) weighs the region's text (a
  ln(strength) bias on its attention scores); a region of strength 0 does nothing in core, so it is dropped (logged);
- set_cond_area "mask bounds" (core samples the mask's bounding box): the region is the bounding box;
- a mask of another size than the image is resized bilinearly (logged), as core resizes it to the latent;
- exactly one entry without mask or area is the global prompt (core would average several; join them with
  Conditioning (Concat) instead); without one, the regions must cover the whole image;
- an all-zero mask, an area outside the image, or a region that covers no 16x16-pixel token raises an error
  naming the region and the fix.
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.nn.functional as F

from ..flux_models.text_encoders import encode
from ..flux_sampler.guidance import progress_from_sigma
from ..flux_sampler.regional import BLOCK_SETS, RegionalConditioning, RegionalSettings, joint_mask
from ..flux_sampler.sampling import TextConditioning
from . import host

logger = logging.getLogger(__name__)

SETTINGS_KEY = "fluxworks_regional"  # RegionalSettings fields, on the global entry (FluxWorksRegionalPrompt)
MAX_TEXT_TOKENS = 4096  # global + regional T5 tokens: 8 regions of 512 (attention cost grows with the square)
MAX_ROWS = 8
SLOTS = 4  # optional conditioning_i / mask_i inputs that replace row i's prompt / rectangle
# Defaults measured on 20 validation layouts x 2 seeds (docs/bench/regional_validation_sweep_2026-12-01.json): double
# blocks up to 50 % progress placed 79 % (colour 100 %, leak 1 %); all blocks over the whole run 68 %; global caption 74 %.
DEFAULT_END_PERCENT = 0.5
DEFAULT_BLOCKS = "double"
_REGION_KEYS = ("mask", "area")


def is_regional(conditioning) -> bool:
    """Whether a CONDITIONING carries regions (several entries, or a mask / area on its entry)."""
    return isinstance(conditioning, list) and (
        len(conditioning) > 1 or any(k in conditioning[0][1] for k in _REGION_KEYS))


def checked_entry(tokens, extras, label: str, width: int) -> TextConditioning:
    """One [T5 tokens, extras] entry -> TextConditioning, checked for a FLUX.1 text encoder of this model."""
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError(f"{label} has no pooled_output: it was not made by a FLUX.1 text encoder")
    if tokens.ndim != 3 or tokens.shape[-1] != width:
        raise ValueError(f"{label} has T5 width {tokens.shape[-1]}, but the model expects {width}: "
                         "the text encoders and the model do not belong together")
    return TextConditioning(tokens, pooled)


def _box(height: int, width: int, top: float, left: float, bottom: float, right: float) -> torch.Tensor:
    mask = torch.zeros(height, width)
    mask[max(0, round(top)):min(height, round(bottom)), max(0, round(left)):min(width, round(right))] = 1.0
    return mask


def entry_mask(extras: dict, label: str, image_hw: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """(H, W) mask at the image size and the strength of a region entry, following core's keys."""
    height, width = image_hw
    strength = float(extras.get("strength", 1.0)) * float(extras.get("mask_strength", 1.0))
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"{label} has strength {strength}; use a finite value >= 0")
    mask = torch.ones(height, width)
    if "area" in extras:
        area = extras["area"]
        if area[0] == "percentage":
            h, w, y, x = (float(v) for v in area[1:5])
            mask = _box(height, width, y * height, x * width, (y + h) * height, (x + w) * width)
        else:
            h, w, y, x = (int(v) * 8 for v in area[:4])  # core stores pixel // 8
            mask = _box(height, width, y, x, y + h, x + w)
        if not mask.any():
            raise ValueError(f"{label}'s area {tuple(area)} lies outside the {width}x{height} image: move it inside")
    if "mask" in extras:
        given = extras["mask"]
        given = given if given.ndim == 3 else given[None]
        if given.shape[0] > 1:
            logger.warning("FluxWorksSampler: %s has a batch of %d masks; the first is used for every image",
                           label, given.shape[0])
        given = given[:1].float().cpu()
        if tuple(given.shape[1:]) != (height, width):
            logger.info("FluxWorksSampler: %s's mask is %dx%d, resized to the %dx%d image", label,
                        given.shape[2], given.shape[1], width, height)
            given = F.interpolate(given[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        given = given[0].clamp(0, 1)
        if not given.any():
            raise ValueError(f"{label}'s mask is empty (all zero): paint the region in the mask, or remove the "
                             "ConditioningSetMask / row")
        if extras.get("set_area_to_bounds"):  # core samples the mask's bounding box ("mask bounds")
            rows, cols = given.any(1).nonzero()[:, 0], given.any(0).nonzero()[:, 0]
            given = _box(height, width, int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
        mask = mask * given
        if not mask.any():
            raise ValueError(f"{label}'s mask and area do not overlap: the region is empty")
    return mask, strength


def regional_conditioning(conditioning, name: str, width: int, image_hw: tuple[int, int]) -> TextConditioning:
    """A CONDITIONING with regions -> RegionalConditioning (see the module docstring for the rules)."""
    base: TextConditioning | None = None
    settings = RegionalSettings(0.0, DEFAULT_END_PERCENT, DEFAULT_BLOCKS)
    regions = []
    globals_seen = 0
    for index, (tokens, extras) in enumerate(conditioning):
        label = f"{name} conditioning entry {index + 1}"
        cond = checked_entry(tokens, extras, label, width)
        if SETTINGS_KEY in extras:
            settings = RegionalSettings(**extras[SETTINGS_KEY])
        if "timestep_start" in extras or "timestep_end" in extras:
            logger.warning("FluxWorksSampler: %s has a timestep range (ConditioningSetTimestepRange); regions apply "
                           "over the regional window instead", label)
        if not any(k in extras for k in _REGION_KEYS):
            globals_seen += 1
            base = cond if base is None else base
            continue
        mask, strength = entry_mask(extras, label, image_hw)
        if strength == 0:
            logger.info("FluxWorksSampler: %s has strength 0 and is left out (as in core)", label)
            continue
        regions.append((cond, mask, strength))
    if globals_seen > 1:
        raise ValueError(f"{name} conditioning holds {globals_seen} prompts without a mask or area (Conditioning "
                         "Combine?); FluxWorksSampler takes one global prompt: join prompts with Conditioning "
                         "(Concat), or give each extra one a mask (ConditioningSetMask) or area")
    if not regions:
        if base is None:
            raise ValueError(f"{name} conditioning has no prompt left (every region has strength 0)")
        return base
    if base is None:
        union = torch.stack([m for _, m, _ in regions]).amax(0)
        if (union <= 0.5).any():
            raise ValueError(f"{name} conditioning has regions but no global prompt (an entry without mask or area), "
                             "and the regions leave part of the image uncovered: combine a global prompt with them")
        base = TextConditioning(regions[0][0].embeds[:, :0], regions[0][0].pooled)
    text = base.embeds.shape[1] + sum(c.embeds.shape[1] for c, _, _ in regions)
    if text > MAX_TEXT_TOKENS:
        raise ValueError(f"{name} conditioning: {len(regions)} regions make {text} T5 tokens with the global prompt, "
                         f"more than the {MAX_TEXT_TOKENS} FluxWorksSampler allows (attention cost grows with the "
                         "square): use fewer regions or a shorter max_sequence_length (256 or 128)")
    return RegionalConditioning.build(base, regions, settings)


def parse_rows(rows: str) -> list[dict]:
    """The `regions` widget: a JSON list of {"prompt", "x", "y", "w", "h" (fractions of the image), "strength",
    "on"}; checked, with the row number in every error."""
    try:
        data = json.loads(rows or "[]")
    except json.JSONDecodeError as e:
        raise ValueError(f"regions is not valid JSON ({e}); expected a list like "
                         '[{"prompt": "a red circle", "x": 0, "y": 0, "w": 0.5, "h": 1}]') from e
    if not isinstance(data, list):
        raise ValueError(f"regions must be a JSON list of rows, got {type(data).__name__}")
    if len(data) > MAX_ROWS:
        raise ValueError(f"regions has {len(data)} rows; at most {MAX_ROWS}")
    out = []
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"regions row {i} must be an object with prompt, x, y, w, h, got {row!r}")
        try:
            box = [float(row.get(k, d)) for k, d in (("x", 0.0), ("y", 0.0), ("w", 1.0), ("h", 1.0))]
            strength = float(row.get("strength", 1.0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"regions row {i}: x, y, w, h and strength must be numbers ({e})") from e
        x, y, w, h = box
        if not all(math.isfinite(v) for v in (*box, strength)):
            raise ValueError(f"regions row {i}: x, y, w, h and strength must be finite numbers, got {row!r}")
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > 1.0001 or y + h > 1.0001:
            raise ValueError(f"regions row {i}: the rectangle x={x}, y={y}, w={w}, h={h} must lie inside the image "
                             "(fractions 0..1, w and h above 0)")
        if not 0 <= strength <= 10:
            raise ValueError(f"regions row {i}: strength {strength} must be within [0, 10]")
        out.append({"prompt": str(row.get("prompt", "")), "x": x, "y": y, "w": w, "h": h, "strength": strength,
                    "on": bool(row.get("on", True))})
    return out


class FluxWorksRegionalPrompt:
    @classmethod
    def INPUT_TYPES(cls):
        percent = {"min": 0.0, "max": 1.0, "step": 0.01}
        optional = {"text_encoder": (host.FLUX_TEXT_ENCODER, {"tooltip": "Encodes the rows' prompt text."}),
                    "image": ("IMAGE", {"tooltip": "Shown under the rectangles in the widget (not used)."})}
        for i in range(1, SLOTS + 1):
            optional[f"conditioning_{i}"] = ("CONDITIONING", {"tooltip": f"Replaces row {i}'s prompt text."})
            optional[f"mask_{i}"] = ("MASK", {"tooltip": f"Replaces row {i}'s rectangle."})
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The global prompt: the whole picture and the "
                                                             "background outside every region."}),
                "regions": ("STRING", {"default": "[]",
                                       "tooltip": "Rows of {prompt, x, y, w, h (fractions of the image), strength, "
                                                  "on}; drawn and edited as rectangles on the node."}),
                "start_percent": ("FLOAT", {"default": 0.0, **percent,
                                            "tooltip": "Sampling progress where the regions start to apply."}),
                "end_percent": ("FLOAT", {"default": DEFAULT_END_PERCENT, **percent,
                                          "tooltip": "Sampling progress after which the prompts mix freely."}),
                "blocks": (list(BLOCK_SETS), {"default": DEFAULT_BLOCKS,
                                              "tooltip": "Transformer blocks that get the regional mask."}),
            },
            "optional": optional,
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("A global prompt plus prompts for regions of the image (rectangles or masks). FluxWorks Sampler "
                   "keeps each region's prompt inside its region with a joint-attention mask; core samplers read "
                   "the same conditioning as ConditioningSetArea/SetMask regions.")

    def build(self, conditioning, regions: str, start_percent: float, end_percent: float, blocks: str,
              text_encoder=None, image=None, **slots):
        if not isinstance(conditioning, list) or len(conditioning) != 1:
            raise ValueError("FluxWorksRegionalPrompt: conditioning must be one prompt (a text encode node's "
                             f"output), got {len(conditioning) if isinstance(conditioning, list) else conditioning}")
        settings = RegionalSettings(start_percent, end_percent, blocks)
        rows = parse_rows(regions)
        for i in range(len(rows) + 1, SLOTS + 1):
            if slots.get(f"conditioning_{i}") is not None or slots.get(f"mask_{i}") is not None:
                raise ValueError(f"FluxWorksRegionalPrompt: conditioning_{i}/mask_{i} is connected but regions has "
                                 f"only {len(rows)} rows: add row {i}")
        tokens, extras = conditioning[0]
        out = [[tokens, {**extras, SETTINGS_KEY: {"start_percent": settings.start_percent,
                                                  "end_percent": settings.end_percent, "blocks": settings.blocks}}]]
        for i, row in enumerate(rows, start=1):
            if not row["on"]:
                continue
            given = slots.get(f"conditioning_{i}")
            if given is not None:
                if len(given) != 1:
                    raise ValueError(f"FluxWorksRegionalPrompt: conditioning_{i} must be one prompt, got {len(given)}")
                r_tokens, r_extras = given[0][0], dict(given[0][1])
            else:
                r_tokens, r_extras = self._encode(text_encoder, row["prompt"], i, tokens.shape[1])
            mask = slots.get(f"mask_{i}")
            if mask is not None:
                r_extras.update({"mask": mask if mask.ndim == 3 else mask[None], "set_area_to_bounds": False,
                                 "mask_strength": row["strength"]})
            else:
                r_extras.update({"area": ("percentage", row["h"], row["w"], row["y"], row["x"]),
                                 "strength": row["strength"], "set_area_to_bounds": False})
            out.append([r_tokens, r_extras])
        if len(out) == 1:
            logger.warning("FluxWorksRegionalPrompt: no region is on; the global prompt is passed through")
        return (out,)

    @staticmethod
    def _encode(text_encoder, prompt: str, row: int, length: int):
        if not prompt.strip():
            raise ValueError(f"FluxWorksRegionalPrompt: row {row} has an empty prompt: type one, connect "
                             f"conditioning_{row}, or switch the row off")
        if text_encoder is None:
            raise ValueError(f"FluxWorksRegionalPrompt: row {row} has prompt text but no text_encoder is connected: "
                             f"connect the FLUX_TEXT_ENCODER (or conditioning_{row})")
        te = host.expect(text_encoder, host.FLUX_TEXT_ENCODER, "FluxWorksRegionalPrompt")
        device = host.load_on_device(te)
        result = encode(te.model.t5, te.model.clip, te.model.tokenizers, prompt, None, length, device)
        if result.t5_dropped_tokens:
            logger.warning("FluxWorksRegionalPrompt: row %d's prompt truncated to %d T5 tokens", row, length)
        out = host.intermediate_device()
        return result.t5_embeds.to(out), {"pooled_output": result.clip_pooled.to(out)}


class CoreRegions:
    """The regions of a CONDITIONING for a core MODEL (FluxWorksRegionalCoreModel): KSampler's positive prompt is
    the global text, these regions' texts follow it, and the joint mask is built per latent size (areas and masks
    are resolved at the image size, as the FluxWorks Sampler does) and applied inside the settings' window, whose
    progress comes from core's sigmas (`progress_from_sigma`, as FluxWorks Schedule Core Model reads it)."""

    def __init__(self, conditioning) -> None:
        if not is_regional(conditioning):
            raise ValueError("FluxWorksRegionalCoreModel: regions has no region (no ConditioningSetMask / "
                             "ConditioningSetArea entry, no FluxWorks Regional Prompt row): connect the regional "
                             "conditioning, not the plain prompt")
        if all(any(k in extras for k in _REGION_KEYS) for _, extras in conditioning):
            # no global entry: KSampler's positive prompt is the global text here, so none is needed
            tokens, extras = conditioning[0]
            conditioning = [[tokens[:, :0], {"pooled_output": extras.get("pooled_output")}], *conditioning]
        self.conditioning = conditioning
        self.width = conditioning[0][0].shape[-1]
        self.settings = next((RegionalSettings(**extras[SETTINGS_KEY]) for _, extras in conditioning
                              if SETTINGS_KEY in extras), RegionalSettings(0.0, DEFAULT_END_PERCENT, DEFAULT_BLOCKS))
        self._built: dict[tuple[int, int], RegionalConditioning] = {}
        self._warned = False
        # checked now, at a nominal image size, so a bad region fails when the node runs rather than mid-sampling
        self.regional(64, 64)

    def regional(self, latent_h: int, latent_w: int) -> RegionalConditioning:
        key = (latent_h, latent_w)
        if key not in self._built:
            cond = regional_conditioning(self.conditioning, "regions", self.width, (latent_h * 8, latent_w * 8))
            if not isinstance(cond, RegionalConditioning):
                raise ValueError("FluxWorksRegionalCoreModel: every region of regions has strength 0")
            self._built[key] = cond
        return self._built[key]

    def extend(self, context: torch.Tensor, latent_hw: tuple[int, int], sigmas, timestep):
        """(region texts, additive joint mask) for a positive chunk; the mask is None outside the window, where the
        texts still follow the global prompt unmasked (as in the FluxWorks Sampler)."""
        cond = self.regional(*latent_hw)
        if context.shape[-1] != self.width:
            raise ValueError(f"FluxWorksRegionalCoreModel: KSampler's prompt has T5 width {context.shape[-1]} but "
                             f"the regions' prompts have {self.width}: encode both with the same text encoders")
        glob = cond.embeds[:, : cond.global_length]
        if not self._warned and glob.shape[1] and (glob.shape[1] != context.shape[1] or not torch.allclose(
                glob[0].to(context), context[0], atol=1e-5)):
            self._warned = True
            logger.warning("FluxWorksRegionalCoreModel: KSampler's positive prompt is not the regions' global prompt; "
                           "KSampler's is used as the global prompt")
        texts = cond.embeds[:1, cond.global_length:]
        if sigmas is not None:
            progress = progress_from_sigma(sigmas, timestep)
            if not self.settings.start_percent <= progress <= self.settings.end_percent:
                return texts, None
        mask = joint_mask(context.shape[1], cond.region_lengths, cond.region_tokens(*latent_hw), cond.strengths)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return texts, mask[None, None]


class FluxWorksRegionalCoreModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A core FLUX.1 MODEL (Load Diffusion Model, FluxWorks Load Core Model)."}),
            "regions": ("CONDITIONING", {"tooltip": "FluxWorks Regional Prompt's output, or core ConditioningSetMask "
                                                    "/ SetArea regions joined by ConditioningCombine."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Regional prompts for core samplers: KSampler's positive prompt is the global prompt, and each "
                   "region's prompt reaches only its region through a joint-attention mask (the FluxWorks Sampler's "
                   "mechanism, one forward pass per step). Connect the plain global prompt to KSampler, not the "
                   "regional conditioning.")

    def apply(self, model, regions):
        core = CoreRegions(regions)
        return (host.regional_core_model(model, core.extend, core.settings.block_indices),)


NODE_CLASS_MAPPINGS = {"FluxWorksRegionalPrompt": FluxWorksRegionalPrompt,
                       "FluxWorksRegionalCoreModel": FluxWorksRegionalCoreModel}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxWorksRegionalPrompt": "FluxWorks Regional Prompt",
                              "FluxWorksRegionalCoreModel": "FluxWorks Regional Core Model"}
