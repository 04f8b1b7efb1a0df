"""FluxWorksTextEncode: prompt -> CONDITIONING in core's FLUX.1 layout (usable by core samplers too)."""

from __future__ import annotations

import logging

from ..flux_models.text_encoders import encode
from . import host

logger = logging.getLogger(__name__)

T5_LENGTHS = ("512", "256", "128")
# Shown to users because the embedded demo model follows only the caption grammar of training/shapes.py
# (Scene.caption); prompts outside it give shapeless colour fields, which looks like a broken pack.
EMBEDDED_GRAMMAR = (
    "The embedded demo model (flux1-shapes-tiny.safetensors) only understands the captions it was trained on: "
    "1-3 object phrases joined by \", \" and \" and \", then \", on a <colour> background\". "
    "An object phrase is \"a/an [small|large] <colour> <shape> <position>\" (no size word = medium). "
    "Colours: red, orange, yellow, green, blue, purple, white, black (each colour once per prompt). "
    "Shapes: circle, square, triangle, star. Positions: at the top left, at the top, at the top right, "
    "on the left, in the center, on the right, at the bottom left, at the bottom, at the bottom right "
    "(each once). Examples: \"a large orange circle in the center, on a purple background\"; "
    "\"a small red star at the top left and a blue square on the right, on a yellow background\". "
    "Use max_sequence_length 128, about 12 steps and guidance 2 with it."
)


class FluxWorksTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (host.FLUX_TEXT_ENCODER,),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                      "tooltip": "Read by T5-XXL (and by CLIP-L when clip_prompt is empty). "
                                                 + EMBEDDED_GRAMMAR}),
                "clip_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                           "tooltip": "Optional separate prompt for CLIP-L (77 tokens)."}),
                "max_sequence_length": (list(T5_LENGTHS), {
                    "default": "512", "tooltip": "T5 tokens: dev was trained with 512, schnell with 256; 128 is "
                                                 "faster for short prompts (the embedded shapes model uses 128)."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Encodes a prompt with T5-XXL + CLIP-L; longer prompts are truncated with a warning. "
                   + EMBEDDED_GRAMMAR)

    def encode(self, text_encoder, prompt: str, clip_prompt: str, max_sequence_length: str):
        te = host.expect(text_encoder, host.FLUX_TEXT_ENCODER, "FluxWorksTextEncode")
        if str(max_sequence_length) not in T5_LENGTHS:
            raise ValueError(f"max_sequence_length must be one of {', '.join(T5_LENGTHS)}, "
                             f"got {max_sequence_length!r}")
        device = host.load_on_device(te)
        holder = te.model
        result = encode(holder.t5, holder.clip, holder.tokenizers, prompt, clip_prompt or None,
                        int(max_sequence_length), device, interrupt=host.check_interrupt)
        if result.t5_dropped_tokens:
            logger.warning("FluxWorksTextEncode: prompt truncated to %s T5 tokens (%d tokens dropped)",
                           max_sequence_length, result.t5_dropped_tokens)
        if result.clip_dropped_tokens:
            logger.warning("FluxWorksTextEncode: CLIP-L prompt truncated to 77 tokens (%d tokens dropped)",
                           result.clip_dropped_tokens)
        out = host.intermediate_device()
        return ([[result.t5_embeds.to(out), {"pooled_output": result.clip_pooled.to(out)}]],)


NODE_CLASS_MAPPINGS = {"FluxWorksTextEncode": FluxWorksTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxWorksTextEncode": "FluxWorks Text Encode"}
