"""Child process of evaluation/core_cache.py: ComfyUI core samples the embedded model with its own KSampler, plain
or through core's EasyCache / LazyCache nodes, and counts how often the transformer really ran.

Usage (the ComfyUI folder importable and current): python core_sampling_child.py SPEC.json INPUTS OUTPUTS
SPEC holds the model file, device, inference dtype, steps, guidance, size, seeds and the jobs (cache node or
none, threshold, start / end percent, whether the cache gets a copy of the model input); INPUTS the FluxWorks text conditioning (context (N, L, D), pooled (N, P)); OUTPUTS gets
one (N, 16, h, w) latent per job, keyed "job<j>", and OUTPUTS.json the transformer calls per caption per job.
Core runs in a process of its own because its modules read the process arguments (--cpu) and keep global
state (loaded models, the device) that must not leak into the caller.
"""

from __future__ import annotations

import json
import sys

spec_path, inputs_path, outputs_path = sys.argv[1:4]
with open(spec_path, encoding="utf-8") as spec_file:
    SPEC = json.load(spec_file)
sys.argv = sys.argv[:1] + (["--cpu"] if SPEC["device"] == "cpu" else [])

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode  # noqa: E402
from comfy_extras.nodes_flux import FluxGuidance  # noqa: E402
from comfy_extras.nodes_model_advanced import ModelSamplingFlux  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py: KSampler, ConditioningZeroOut)

CACHE_NODES = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_input_wrapper(executor, *args, **kwargs):
    """Outermost DIFFUSION_MODEL wrapper: the wrappers inside it get a copy of the latent. EasyCache adds its
    cached difference to the latent in place on a skipped step; when core's model input is the sampler's own
    tensor (fp32 inference: `xc.to(dtype)` does not copy) that also changes the `x` that calculate_denoised
    then uses. With bf16 / fp16 inference the cast copies, so this gives fp32 runs the behaviour of those."""
    return executor(args[0].clone(), *args[1:], **kwargs)


def load_core_patcher(path: str) -> comfy.model_patcher.ModelPatcher:
    """The steps of core's comfy.sd.load_diffusion_model with strict key matching, wrapped in core's
    ModelPatcher. One change: core's FLUX.1 detection fixes 24 heads (width 3072); the embedded model's head
    count is its width over the head width (sum of the RoPE axes, 128)."""
    sd = comfy.utils.load_torch_file(path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None or config.unet_config.get("image_model") != "flux":
        raise ValueError(f"core does not detect FLUX.1 in {path}")
    unet = config.unet_config
    unet["num_heads"] = unet["hidden_size"] // sum(unet["axes_dim"])
    config.set_inference_dtype(DTYPES[SPEC["inference_dtype"]], None)
    model = config.get_model(sd, "")
    model.diffusion_model.load_state_dict(config.process_unet_state_dict(sd), strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def job_model(base: comfy.model_patcher.ModelPatcher, job: dict) -> comfy.model_patcher.ModelPatcher:
    """Core's ModelSamplingFlux at the sampling size (the shift FluxWorks' schedule uses), then the cache node."""
    size = SPEC["size"]
    [model] = ModelSamplingFlux().patch(base, SPEC["max_shift"], SPEC["base_shift"], size, size)
    if job["cache"] is None:
        return model
    if job["copy_input"]:
        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "fluxworks_copy_input",
                                   copy_input_wrapper)
    node = CACHE_NODES[job["cache"]]
    return node.execute(model, job["reuse_threshold"], job["start_percent"], job["end_percent"], False).args[0]


def main() -> None:
    inputs = load_file(inputs_path)
    base = load_core_patcher(SPEC["model"])
    calls = [0]
    # Every real transformer evaluation passes img_in once; a step the cache skips never reaches it.
    base.model.diffusion_model.img_in.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    latent_hw = SPEC["size"] // 8
    outputs, counts = {}, []
    for index, job in enumerate(SPEC["jobs"]):
        model = job_model(base, job)
        latents, job_calls = [], []
        for i, seed in enumerate(SPEC["seeds"]):
            [positive] = FluxGuidance.execute([[inputs["context"][i:i + 1], {"pooled_output": inputs["pooled"][i:i + 1]}]],
                                              SPEC["guidance"]).args
            [negative] = nodes.ConditioningZeroOut().zero_out(positive)
            empty = {"samples": torch.zeros(1, 16, latent_hw, latent_hw)}  # what EmptySD3LatentImage gives
            calls[0] = 0
            [out] = nodes.KSampler().sample(model, seed, SPEC["steps"], 1.0, "euler", "simple", positive, negative,
                                            empty, 1.0)
            latents.append(out["samples"].float().cpu())
            job_calls.append(calls[0])
        outputs[f"job{index}"] = torch.cat(latents).contiguous()
        counts.append(job_calls)
    save_file(outputs, outputs_path)
    with open(outputs_path + ".json", "w", encoding="utf-8") as f:
        json.dump({"transformer_calls": counts}, f)


main()
