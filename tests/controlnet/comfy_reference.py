"""ComfyUI core's residuals for Flux ControlNet files: run in a subprocess with the host on PYTHONPATH.

Usage: python comfy_reference.py INPUTS.safetensors OUT.safetensors NAME=PATH:KIND[:MODE] ...
Each file goes through the key conversion core's `comfy/controlnet.py` applies to its KIND (instantx/union:
`convert_diffusers_mmdit`, mistoline: `convert_mistoline`, xlabs: none) into core's `ControlNetFlux`, which is
called directly; writes `NAME.input.i` / `NAME.output.i`, core's 19 + 38 per-block residuals. The sizes are
read from the weights here because core's own detection assumes FLUX.1's 24 heads, which tiny models lack.
"""

from __future__ import annotations

import sys

import comfy.cli_args

comfy.cli_args.args.cpu = True  # before model_management is imported: no CUDA probing on this machine

import comfy.controlnet  # noqa: E402
import comfy.ldm.flux.controlnet  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def core_state_dict(sd: dict, kind: str) -> dict:
    if kind in ("instantx", "union"):
        converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
        converted.update(sd)
        return converted
    if kind == "mistoline":
        return comfy.controlnet.convert_mistoline(sd)
    return sd


def build(sd: dict, kind: str):
    hidden = sd["img_in.weight"].shape[0]
    kwargs = dict(
        in_channels=16, out_channels=16, vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        context_in_dim=sd["txt_in.weight"].shape[1], hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128,
        depth=comfy.model_detection.count_blocks(sd, "double_blocks.{}."),
        depth_single_blocks=comfy.model_detection.count_blocks(sd, "single_blocks.{}."),
        axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )
    if kind in ("instantx", "union"):
        modes = sd["controlnet_mode_embedder.weight"].shape[0] if "controlnet_mode_embedder.weight" in sd else 0
        model = comfy.ldm.flux.controlnet.ControlNetFlux(
            latent_input=True, num_union_modes=modes, control_latent_channels=sd["pos_embed_input.weight"].shape[1] // 4,
            operations=comfy.ops.disable_weight_init, **kwargs)
    else:
        model = comfy.ldm.flux.controlnet.ControlNetFlux(mistoline=kind == "mistoline",
                                                         operations=comfy.ops.disable_weight_init, **kwargs)
    missing, _ = model.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(f"core's ControlNetFlux is missing {missing[:8]}")
    return model.float().eval()


def main() -> None:
    inputs = load_file(sys.argv[1])
    out: dict[str, torch.Tensor] = {}
    for spec in sys.argv[3:]:
        name, rest = spec.split("=", 1)
        path, kind, *mode = rest.split(":")
        model = build(core_state_dict(comfy.utils.load_torch_file(path, safe_load=True), kind), kind)
        hint = inputs["latent_hint"] if kind in ("instantx", "union") else inputs["image_hint"]
        with torch.no_grad():
            result = model(inputs["x"], inputs["timesteps"], inputs["context"], y=inputs["y"],
                           guidance=inputs["guidance"], hint=hint, control_type=[int(m) for m in mode])
        for part in ("input", "output"):
            for i, residual in enumerate(result.get(part, ())):
                out[f"{name}.{part}.{i}"] = residual.clone()  # core repeats tensors; files need copies
    save_file(out, sys.argv[2])


if __name__ == "__main__":
    main()
