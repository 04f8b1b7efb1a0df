"""FluxWorksMultiGPU: sample on several GPUs (flux_parallel). The node only records the plan on the FLUX_MODEL;
the FluxWorks Sampler hands the run to the workers when it finds one."""

from __future__ import annotations

import dataclasses

import torch

from ..flux_parallel.plan import MODES, ParallelPlan
from ..flux_parallel.pool import WorkerFault, WorkerPool
from ..flux_sampler.regional import RegionalConditioning
from ..flux_sampler.sampling import TextConditioning
from ..flux_speed.prepare import SpeedOptions
from . import host

PLAN_KEY = "fluxworks_parallel"


def parallel_plan(patcher) -> ParallelPlan | None:
    return patcher.model_options.get("transformer_options", {}).get(PLAN_KEY)


class FluxWorksMultiGPU:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.FLUX_MODEL,),
            "devices": ("STRING", {"default": "all", "tooltip": "GPUs to use: 'all', or a list such as "
                                   "'cuda:0,cuda:1' (or '0,1'). One worker process per GPU holds the model."}),
            "mode": (list(MODES), {"default": MODES[0], "tooltip": "split image: every GPU works on every image, "
                                   "each on its share of the tokens (diffusers' context parallelism): one image "
                                   "faster. spread batch: each GPU samples its share of the batch."}),
        }}

    RETURN_TYPES = (host.FLUX_MODEL,)
    FUNCTION = "apply"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Runs the FluxWorks Sampler on several GPUs through worker processes (weights sent once, LoRA "
                   "changes sent as they happen). The ComfyUI process itself does not load the model.")

    def apply(self, model, devices: str, mode: str):
        patcher = host.expect(model, host.FLUX_MODEL, "FluxWorksMultiGPU")
        plan = ParallelPlan.parse(devices, mode)
        out = patcher.clone()
        options = dict(out.model_options.get("transformer_options", {}))
        out.model_options["transformer_options"] = {**options, PLAN_KEY: plan}
        return (out,)


def _rows(cond: TextConditioning | None, start: int, stop: int, batch: int) -> TextConditioning | None:
    """The conditioning for latent rows [start, stop): a batch of prompts is cut like the latent (a regional one
    keeps its regions); one prompt is shared."""
    if cond is None or cond.embeds.shape[0] != batch or batch == 1:
        return cond
    return dataclasses.replace(cond, embeds=cond.embeds[start:stop], pooled=cond.pooled[start:stop])


def _check_supported(plan: ParallelPlan, options: SpeedOptions, controls: bool, positive, latent: torch.Tensor,
                     text_lengths: list[int]) -> None:
    if controls:
        raise ValueError("FluxWorks Multi-GPU does not run ControlNets yet: remove the FluxWorks Multi-GPU node "
                         "to use a ControlNet (it runs on one GPU)")
    if options.offload:
        raise ValueError("block offload (offload_resident_blocks >= 0) is for one small GPU; set it to -1 with "
                         "FluxWorks Multi-GPU, whose workers each hold the whole model")
    if plan.mode == "split image":
        if isinstance(positive, RegionalConditioning):
            raise ValueError("regional prompts need the whole token grid in one attention mask: use mode 'spread "
                             "batch' with FluxWorks Multi-GPU, or remove the node")
        h, w = latent.shape[2:]
        n = plan.world_size
        tokens = (h // 2) * (w // 2)
        bad = [f"{tokens} image tokens"] if tokens % n else []
        bad += [f"{t} text tokens" for t in text_lengths if t % n]
        if bad:
            raise ValueError(f"mode 'split image' divides the tokens over {n} GPUs, but this run has "
                             f"{' and '.join(bad)}: pick a width and height whose (w/16)*(h/16) divides by {n} "
                             f"(e.g. 1024x1024), a text length that does, or mode 'spread batch'")


def sample_on_workers(patcher, plan: ParallelPlan, options: SpeedOptions, *, has_controls: bool, steps: int,
                      positive: TextConditioning, negative: TextConditioning | None, latent: torch.Tensor,
                      noise: torch.Tensor, sigmas: torch.Tensor, curve) -> torch.Tensor:
    """The sampler's run on the plan's workers; returns the model-space result on the CPU. The pool is kept on the
    FLUX_MODEL between prompts (like the prepared transformer), restarted when the plan changes or a worker failed."""
    texts = [positive.embeds.shape[1]] + ([negative.embeds.shape[1]] if negative is not None else [])
    _check_supported(plan, options, has_controls, positive, latent, texts)
    flux = patcher.model
    pool = flux.parallel_workers
    if pool is None or pool.plan != plan or not pool.alive:
        if pool is not None:
            pool.close()
        flux.parallel_workers = None
        pool = flux.parallel_workers = WorkerPool(plan)
    args = dict(guidance_embeds=flux.config.guidance_embeds, positive=positive, negative=negative, latent=latent,
                noise=noise, sigmas=sigmas, curve=curve)
    try:
        weights_id = host.weight_patches_id(patcher)
        if pool.weights_id != weights_id:
            with host.patched_in_host_memory(patcher) as transformer:
                tensors = dict(transformer.named_parameters())
                pool.load_weights(weights_id, transformer.config, flux.compute_dtype,
                                  lambda names: ((n, tensors[n]) for n in (tensors if names is None else names)),
                                  host.patched_transformer_names(patcher))
        if plan.mode == "split image":
            jobs = [args] * plan.world_size
        else:
            batch = latent.shape[0]
            bounds = torch.tensor_split(torch.arange(batch), min(batch, plan.world_size))
            jobs = [dict(args, latent=latent[b[0]:b[-1] + 1], noise=noise[b[0]:b[-1] + 1],
                         positive=_rows(positive, int(b[0]), int(b[-1]) + 1, batch),
                         negative=_rows(negative, int(b[0]), int(b[-1]) + 1, batch)) for b in bounds]
        parts = pool.sample([{"options": options, "compute_dtype": flux.compute_dtype, "sample_args": job}
                             for job in jobs], host.progress_callback(steps), host.check_interrupt)
    except WorkerFault:
        flux.parallel_workers = None
        raise
    return torch.cat(parts)


NODE_CLASS_MAPPINGS = {"FluxWorksMultiGPU": FluxWorksMultiGPU}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxWorksMultiGPU": "FluxWorks Multi-GPU"}
