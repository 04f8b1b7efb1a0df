"""Thin ComfyUI adapters; the numerics live in flux_sampler/ and flux_models/.

Each module below defines NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS for its node family.
"""

from . import controlnet, guidance, host, loaders, lora, multi_gpu, regional, sampler, speed, text_encode, training

_MODULES = (loaders, text_encode, guidance, sampler, lora, controlnet, speed, multi_gpu, regional, training)

host.register_embedded_model()

NODE_CLASS_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}
