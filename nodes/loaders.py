"""FluxWorksModelLoader and FluxWorksTextEncoderLoader."""

from __future__ import annotations

import folder_paths

from ..flux_models.dtypes import WEIGHT_DTYPE_CHOICES, storage_and_compute
from ..flux_models.files import preview_vae_name
from ..flux_models.holders import FluxModel, FluxTextEncoder
from ..flux_models.text_encoders import Tokenizers, load_clip_l, load_t5
from ..flux_models.transformer import load_flux_transformer
from . import host


class FluxWorksModelLoader:
    """A FLUX.1 dev/schnell transformer from a BFL single file, an fp8 file or a diffusers folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.model_choices(), {
                    "tooltip": "A file or diffusers folder in models/diffusion_models (or models/unet)."}),
                "weight_dtype": (list(WEIGHT_DTYPE_CHOICES), {
                    "default": "default",
                    "tooltip": "default: bf16 on GPU (fp32 on CPU), fp8 files stay fp8. fp8_*: store weights "
                               "in fp8 and compute in bf16, halving memory."}),
            }
        }

    RETURN_TYPES = (host.FLUX_MODEL,)
    RETURN_NAMES = ("flux_model",)
    FUNCTION = "load"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Loads FLUX.1 dev or schnell; the architecture is read from the weights."

    def load(self, model_name: str, weight_dtype: str):
        path = host.full_path("diffusion_models", model_name)
        load_device, offload_device = host.model_devices()
        transformer, config, compute = load_flux_transformer(
            path, weight_dtype, host.default_compute_dtype(load_device)
        )
        model = FluxModel(transformer, config, compute, path, preview_vae_name(path))
        return (host.wrap_patcher(model, load_device, offload_device),)


class FluxWorksTextEncoderLoader:
    """T5-XXL and CLIP-L from ComfyUI-format files in models/text_encoders (or models/clip)."""

    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list("text_encoders")
        return {
            "required": {
                "t5_name": (names, {"tooltip": "t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled) .safetensors"}),
                "clip_name": (names, {"tooltip": "clip_l.safetensors"}),
                "weight_dtype": (["default", "bf16", "fp16", "fp32", "fp8_e4m3fn"], {
                    "default": "default",
                    "tooltip": "default: bf16 on GPU (fp32 on CPU); fp8 T5 files stay fp8. fp8_e4m3fn stores "
                               "T5 in fp8."}),
            }
        }

    RETURN_TYPES = (host.FLUX_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Loads the FLUX.1 text encoders; tokenizers come from ComfyUI's own files."

    def load(self, t5_name: str, clip_name: str, weight_dtype: str):
        t5_path = host.full_path("text_encoders", t5_name)
        clip_path = host.full_path("text_encoders", clip_name)
        load_device, offload_device = host.text_encoder_devices()
        default = host.default_compute_dtype(load_device)
        storage, compute = storage_and_compute(weight_dtype, default, default)
        t5 = load_t5(t5_path, None if weight_dtype == "default" else storage, compute)
        clip = load_clip_l(clip_path, compute)
        tokenizers = Tokenizers.from_folders(*host.tokenizer_folders())
        holder = FluxTextEncoder(t5, clip, tokenizers, compute, (t5_path, clip_path))
        return (host.wrap_patcher(holder, load_device, offload_device),)


NODE_CLASS_MAPPINGS = {
    "FluxWorksModelLoader": FluxWorksModelLoader,
    "FluxWorksTextEncoderLoader": FluxWorksTextEncoderLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxWorksModelLoader": "FluxWorks Load FLUX.1 Model",
    "FluxWorksTextEncoderLoader": "FluxWorks Load Text Encoders (T5 + CLIP-L)",
}
