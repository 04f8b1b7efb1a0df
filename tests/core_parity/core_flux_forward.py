"""Child process of test_core_flux_forward: ComfyUI core reads FLUX.1 files and runs one forward of each.

Usage (the ComfyUI folder importable and current): python core_flux_forward.py INPUTS OUTPUTS MODEL_FILE...
INPUTS holds x (B, 16, H, W), timestep (B,), guidance (B,), context (B, L, D), y (B, P); OUTPUTS gets one
velocity (B, 16, H, W) per model file, keyed by its position ("0", "1", ...).
"""

from __future__ import annotations

import sys

inputs_path, outputs_path, *model_paths = sys.argv[1:]
sys.argv = sys.argv[:1] + ["--cpu"]  # core's argument parser reads sys.argv: run it on the CPU, nothing else

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.model_detection  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def load_core_flux(path: str) -> torch.nn.Module:
    """The steps of core's comfy.sd.load_diffusion_model, fp32, with strict key matching.

    One change: core's detection fixes 24 heads (FLUX.1's 3072 width); a narrow test file gets width / 128.
    """
    sd = comfy.utils.load_torch_file(path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None:  # diffusers key names
        sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
        config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None or config.unet_config.get("image_model") != "flux":
        raise ValueError(f"core does not detect FLUX.1 in {path}")
    unet = config.unet_config
    unet["num_heads"] = unet["hidden_size"] // sum(unet["axes_dim"])
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    model.diffusion_model.load_state_dict(config.process_unet_state_dict(sd), strict=True)
    return model.diffusion_model.eval()


def main() -> None:
    inputs = load_file(inputs_path)
    outputs = {}
    for index, path in enumerate(model_paths):
        flux = load_core_flux(path)
        guidance = inputs["guidance"] if flux.params.guidance_embed else None
        with torch.no_grad():
            outputs[str(index)] = flux(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"],
                                       guidance=guidance).contiguous()
    save_file(outputs, outputs_path)


main()
