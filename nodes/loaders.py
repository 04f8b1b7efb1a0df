"""FluxWorksModelLoader and FluxWorksTextEncoderLoader."""

from __future__ import annotations

from ..flux_models.dtypes import WEIGHT_DTYPE_CHOICES, storage_and_compute
from ..flux_models.files import preview_vae_name
from ..flux_models.holders import FluxModel, FluxTextEncoder
from ..flux_models.text_encoders import CLIP_L, T5, Tokenizers, load_clip_l, load_t5, text_encoder_file
from ..flux_models.transformer import load_flux_transformer, read_flux_file
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


class FluxWorksCoreModelLoader:
    """Any FLUX.1 transformer the FluxWorks loader reads, as a core MODEL: core's own UNETLoader builds only the
    3072-wide FLUX.1 (it fixes 24 heads), so narrower or wider models (the embedded one) need this loader to
    reach KSampler, core LoRA loaders and core model patches."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.model_choices(), {
                    "tooltip": "A FLUX.1 file (BFL or diffusers layout, any width) or diffusers folder in "
                               "models/diffusion_models (or models/unet)."}),
                "weight_dtype": (list(host.CORE_WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "As in core's Load Diffusion Model: default keeps ComfyUI's choice; fp8_* store "
                               "the weights in fp8 (_fast also computes in fp8 where the GPU can)."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Loads any FLUX.1 transformer (BFL or diffusers layout, any width, head count and depth, the "
                   "embedded model too) as a core MODEL for KSampler, core LoRA loaders and model patches; the "
                   "architecture is read from the weights.")

    def load(self, model_name: str, weight_dtype: str):
        path = host.full_path("diffusion_models", model_name)
        return (host.core_flux_model(read_flux_file(path), weight_dtype),)


def text_encoder_choices() -> dict[str, list[str]]:
    """{T5: [...], CLIP_L: [...]}: the files in the text_encoders folders by what their keys hold, read from each
    file's header once per version of the file. Unreadable files and files of other kinds are in neither list
    (logged once, with the reason), so neither picker offers a file its side cannot load; a merged file holding
    both encoders is in both. Files of FLUX.1's own sizes (T5-XXL, CLIP-L) come first, so the default (the first
    entry) works even beside e.g. SDXL's CLIP-G; then the user's folders before the embedded model's."""
    out: dict[str, list[tuple[bool, str]]] = {T5: [], CLIP_L: []}
    for name in host.filename_list("text_encoders"):
        found = text_encoder_file(host.full_path("text_encoders", name))
        for kind in found.kinds:
            out[kind].append((kind not in found.flux_sized, name))
    return {kind: [name for _, name in sorted(entries, key=lambda e: e[0])] for kind, entries in out.items()}


_WHICH = {T5: ("t5_name", "a T5-XXL text encoder (t5xxl_*.safetensors)"),
          CLIP_L: ("clip_name", "a CLIP-L text encoder (clip_l.safetensors)")}


class FluxWorksTextEncoderLoader:
    """T5-XXL and CLIP-L from ComfyUI-format files in models/text_encoders (or models/clip). Each picker lists only
    the files of its kind, read from their keys, so the first entry of each is a working default."""

    @classmethod
    def INPUT_TYPES(cls):
        choices = text_encoder_choices()
        return {
            "required": {
                "t5_name": (choices[T5], {"tooltip": "T5-XXL files in models/text_encoders (t5xxl_fp16, "
                                                     "t5xxl_fp8_e4m3fn(_scaled)); only T5 files are listed."}),
                "clip_name": (choices[CLIP_L], {"tooltip": "CLIP-L files in models/text_encoders (clip_l); only "
                                                           "CLIP text encoders are listed."}),
                "weight_dtype": (["default", "bf16", "fp16", "fp32", "fp8_e4m3fn"], {
                    "default": "default",
                    "tooltip": "default: bf16 on GPU (fp32 on CPU); fp8 T5 files stay fp8. fp8_e4m3fn stores "
                               "T5 in fp8."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, t5_name, clip_name):
        """Instead of core's "Value not in list": say what the file is and which input takes it."""
        choices = text_encoder_choices()
        problems = []
        for kind, value in ((T5, t5_name), (CLIP_L, clip_name)):
            if value in choices[kind]:
                continue
            input_name, wanted = _WHICH[kind]
            listed = ", ".join(choices[kind]) or "none"
            other = next((k for k in (T5, CLIP_L) if k != kind and value in choices[k]), None)
            if other is not None:
                problems.append(f"{input_name} '{value}' is {_WHICH[other][1]}, not {wanted}: choose it as "
                                f"{_WHICH[other][0]}, and one of these as {input_name}: {listed}")
            else:
                problems.append(f"{input_name} '{value}' is not {wanted} in models/text_encoders (missing, "
                                f"unreadable or another kind of file: the server log says which); choose one of: "
                                f"{listed}")
        return True if not problems else "; ".join(problems)

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
    "FluxWorksCoreModelLoader": FluxWorksCoreModelLoader,
    "FluxWorksTextEncoderLoader": FluxWorksTextEncoderLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxWorksModelLoader": "FluxWorks Load FLUX.1 Model",
    "FluxWorksCoreModelLoader": "FluxWorks Load Core Model",
    "FluxWorksTextEncoderLoader": "FluxWorks Load Text Encoders (T5 + CLIP-L)",
}
