"""Per-step cost of 0, 1 and 2 Flux ControlNets: FluxWorks (the FluxWorks Sampler's path, `sample_prepared` with the
options a FLUX_MODEL carries without a Speed node, and flux_controlnet's ControlStack) next to ComfyUI core
(ControlNetApplyAdvanced + comfy.sample), same weights, same run.

Models: a full-size FLUX.1-dev transformer (19 double + 38 single blocks, width 3072) and ControlNets shaped
like InstantX Canny (5 double + 10 single blocks) and Shakker Union-Pro (6 double blocks, 10 union modes, used
in depth mode), random weights initialised on the GPU in bf16. Core gets the same state dicts through its own
loaders (`comfy.sd.load_diffusion_model_state_dict`, `comfy.controlnet.load_controlnet_state_dict`).

Per-step cost = (time of a `--steps` run - time of a 2-step run) / (steps - 2): fixed per-run work (control
image VAE encoding, model loading checks, the sampler's per-run `prepare`) cancels out; the first of the three runs
warms up (on a GPU the default options compile the blocks). Both sides run under torch.inference_mode, as ComfyUI
runs nodes. `--tiny` runs 1 + 1 blocks on the CPU (fp32, 32 px, 3 steps) to check the script; core's loaders
assume 24 heads of 128, so even the tiny models are 3072 wide.

Usage (repo root; ComfyUI and the package `fluxworks` come from PYTHONPATH, nothing edits sys.path):
  here:  PYTHONPATH=.comfyui .venv/bin/python bench/controlnet_gpu.py --tiny --comfy .comfyui
  GPU:   mkdir -p /tmp/pk && ln -sfn $PWD /tmp/pk/fluxworks && \\
         PYTHONPATH=/tmp/pk:/tmp/site:$PWD/.comfy python3 bench/controlnet_gpu.py --comfy .comfy [--steps 20] [--res 1024]
Run it by its path: with the repository root on sys.path (`python -m bench.controlnet_gpu`) our `nodes` package
would hide core's nodes.py. Prints one JSON line per finished measurement and writes $OUT/controlnet_bench.json
when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict

import torch

FULL = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768)
TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=32, pooled_projection_dim=16)
UNION_DEPTH = 2  # Flux union mode table: canny 0, tile 1, depth 2, ...


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (a 12B model in fp32 would need 48 GB first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device.type == "cuda" else 0.0


def measure(clock: Clock, run, steps: int) -> dict:
    """Warm up, then time a 2-step and a `steps`-step run; the difference is the per-step cost."""
    run(2)
    clock.reset_peak()
    short = clock.seconds(lambda: run(2))
    long = clock.seconds(lambda: run(steps))
    return {"ms_per_step": round(1000 * (long - short) / (steps - 2), 1), "run_s": round(long, 3),
            "peak_gib": clock.peak_gib()}


def build_models(sizes: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from fluxworks.flux_controlnet import ControlNetConfig, FluxControlNet, build_controlnet

    with torch.device(device), default_dtype(dtype):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(guidance_embeds=True, **sizes).eval().requires_grad_(False)
        nets = []
        for kind, double, single, modes in (("instantx", 5, 10, None), ("union", 6, 0, 10)):
            if sizes is TINY:
                double, single = 1, min(single, 1)
            config = ControlNetConfig(kind=kind, in_channels=64, num_layers=double, num_single_layers=single,
                                      attention_head_dim=128, num_attention_heads=24,
                                      joint_attention_dim=sizes["joint_attention_dim"],
                                      pooled_projection_dim=sizes["pooled_projection_dim"], guidance_embeds=True,
                                      axes_dims_rope=(16, 56, 56), num_mode=modes)
            nets.append(FluxControlNet(build_controlnet(config, None, dtype), config, dtype, f"random {kind}"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return transformer, nets, vae


def load_core(comfy_dir: str | None, device: torch.device):
    """ComfyUI as a library, set up as its launcher does: its argument parser reads sys.argv (--cpu for the CPU)
    when comfy.model_management is first imported, which importing anything under `fluxworks` does; so this runs
    before any of those imports. Checks that the ComfyUI on PYTHONPATH is `comfy_dir` (default: whichever it is)
    and that `import nodes` finds its nodes.py."""
    spec = importlib.util.find_spec("comfy")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit(f"ComfyUI is not importable: put its folder on PYTHONPATH (PYTHONPATH={comfy_dir or '...'})")
    found = os.path.dirname(os.path.realpath(list(spec.submodule_search_locations)[0]))
    sys.argv = [sys.argv[0]] + (["--cpu"] if device.type == "cpu" else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.controlnet
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    from fluxworks.bench.report import check_comfy

    check_comfy(comfy_dir or found)
    return comfy


def core_apply_controlnet(comfy):
    """(apply function, what it is): core's ControlNetApplyAdvanced from its nodes.py (`load_core` checked that
    `nodes` is core's). nodes.py needs PyAV; without it, the same ControlNet API calls the node makes
    (`copy().set_cond_hint(...)`, `set_previous_controlnet`) stand in, and the result says so."""
    try:
        import nodes as core_nodes

        return core_nodes.ControlNetApplyAdvanced().apply_controlnet, "nodes.ControlNetApplyAdvanced"
    except ImportError as exc:
        reason = f"comfy.controlnet calls as in ControlNetApplyAdvanced (nodes.py not importable: {exc})"

    def apply(positive, negative, control_net, image, strength, start, end, vae=None):
        made: dict = {}  # one ControlNet copy per previous control, shared by positive and negative
        out = []
        for conditioning in (positive, negative):
            entries = []
            for tokens, extras in conditioning:
                previous = extras.get("control")
                if previous not in made:
                    made[previous] = control_net.copy().set_cond_hint(image.movedim(-1, 1), strength, (start, end),
                                                                      vae=vae)
                    made[previous].set_previous_controlnet(previous)
                entries.append([tokens, {**extras, "control": made[previous], "control_apply_to_uncond": False}])
            out.append(entries)
        return tuple(out)
    return apply, reason


def time_fluxworks(results: dict, report, clock: Clock, comfy, transformer, nets, core_vae, inputs: dict) -> None:
    """Our sampler with the controls as FluxWorksSampler builds them (control images VAE-encoded per run), run as
    the node runs it: `sample_prepared` with the options of a model without a Speed node on this device and
    ComfyUI's interrupt check."""
    from fluxworks.flux_controlnet import ControlStack, ControlUnit
    from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, calculate_mu, get_sigmas
    from fluxworks.flux_sampler.latents import pack, to_model_space
    from fluxworks.flux_speed.prepare import SpeedOptions, sample_prepared

    device, dtype, res = inputs["device"], inputs["dtype"], inputs["res"]
    prompt = TextConditioning(inputs["embeds"], inputs["pooled"])
    options = SpeedOptions.defaults_for(device)
    results["fluxworks_options"] = asdict(options)
    interrupt = comfy.model_management.throw_exception_if_processing_interrupted

    def ours(count: int):
        def run(n_steps: int) -> None:
            units = []
            for net, mode in list(zip(nets, (None, UNION_DEPTH), strict=True))[:count]:
                cond = pack(to_model_space(core_vae.encode(inputs["image"]).float())).to(device, dtype)
                units.append(ControlUnit(net, cond, strength=0.7, mode=mode))
            sigmas = get_sigmas(n_steps, calculate_mu((res // 16) ** 2)).to(device)
            stack = ControlStack(units, transformer.config) if units else None
            sample_prepared(transformer, options, device, dtype, interrupt=interrupt, guidance_embeds=True,
                            positive=prompt, negative=None, latent=torch.zeros(inputs["latent_shape"], device=device),
                            noise=inputs["noise"], sigmas=sigmas, curve=GuidanceCurve.constant(3.5), controls=stack)
        return run

    for count in (0, 1, 2):
        results[f"fluxworks_{count}cn"] = measure(clock, ours(count), inputs["steps"])
        report()


def time_core(results: dict, report, clock: Clock, comfy, apply, state: dict, net_states: list[dict], core_vae,
              inputs: dict) -> None:
    """ComfyUI core: the same weights through its loaders, ControlNetApplyAdvanced and comfy.sample."""
    model = comfy.sd.load_diffusion_model_state_dict(state)
    state.clear()
    core_nets = [comfy.controlnet.load_controlnet_state_dict(s) for s in net_states]
    core_nets[1] = core_nets[1].copy()
    core_nets[1].set_extra_arg("control_type", [UNION_DEPTH])  # what core's SetUnionControlNetType does
    embeds, pooled = inputs["embeds"].cpu(), inputs["pooled"].cpu()
    positive = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[torch.zeros_like(embeds), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = torch.zeros(inputs["latent_shape"])
    noise = comfy.sample.prepare_noise(latent, 42)

    def core(count: int):
        pos, neg = positive, negative
        for control_net in core_nets[:count]:
            pos, neg = apply(pos, neg, control_net, inputs["image"], 0.7, 0.0, 1.0, vae=core_vae)

        def run(n_steps: int) -> None:
            comfy.sample.sample(model, noise, n_steps, 1.0, "euler", "simple", pos, neg, latent, disable_pbar=True)
        return run

    for count in (0, 1, 2):
        results[f"comfyui_core_{count}cn"] = measure(clock, core(count), inputs["steps"])
        report()


def main() -> None:
    with torch.inference_mode():  # as ComfyUI runs nodes
        run()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="1 + 1 blocks on the CPU, to check the script")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (GPU) / 3 (--tiny)")
    parser.add_argument("--res", type=int, default=None, help="square image size; default 1024 (GPU) / 32 (--tiny)")
    parser.add_argument("--comfy", default=None, help="ComfyUI folder; must be the one on PYTHONPATH (default: "
                        "whichever is)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    steps, res = args.steps or (3 if args.tiny else 20), args.res or (32 if args.tiny else 1024)
    if steps < 3:
        raise SystemExit("--steps must be at least 3 (the per-step cost is taken against a 2-step run)")
    sizes = TINY if args.tiny else FULL
    clock = Clock(device)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "res": res,
                     "steps": steps, "dtype": str(dtype).replace("torch.", ""), "controlnets": [
                         "instantx 5+10 blocks (canny)", "union-pro 6+0 blocks (depth mode)"]}

    def report() -> None:
        print(json.dumps(results), flush=True)  # noqa: T201 - the JSON on stdout is this script's output

    comfy = load_core(args.comfy, device)
    from fluxworks.flux_sampler.latents import make_noise

    apply, results["core_apply"] = core_apply_controlnet(comfy)
    start = time.perf_counter()
    transformer, nets, vae = build_models(sizes, device, dtype)
    clock.sync()
    results["init_s"] = round(time.perf_counter() - start, 1)
    results["params_B"] = {"transformer": round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2),
                           "controlnets": [round(sum(p.numel() for p in n.parameters()) / 1e9, 2) for n in nets]}
    report()
    torch.manual_seed(1)
    latent_shape = (1, 16, res // 8, res // 8)
    inputs = {
        "device": device, "dtype": dtype, "res": res, "steps": steps, "latent_shape": latent_shape,
        "embeds": torch.randn(1, 16 if args.tiny else 512, sizes["joint_attention_dim"], device=device, dtype=dtype),
        "pooled": torch.randn(1, sizes["pooled_projection_dim"], device=device, dtype=dtype),
        "image": torch.rand(1, res, res, 3),  # a ComfyUI IMAGE; both sides encode it with the same core VAE
        "noise": make_noise(latent_shape, 42).to(device),
    }
    core_vae = comfy.sd.VAE(sd={k: v.detach().to("cpu", torch.float32) for k, v in vae.state_dict().items()})
    del vae

    time_fluxworks(results, report, clock, comfy, transformer, nets, core_vae, inputs)
    state = {k: v.to("cpu") for k, v in transformer.state_dict().items()}
    net_states = [{k: v.to("cpu") for k, v in n.model.state_dict().items()} for n in nets]
    del transformer, nets  # free the GPU: core's memory manager would otherwise see it taken
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    time_core(results, report, clock, comfy, apply, state, net_states, core_vae, inputs)

    for name in ("fluxworks", "comfyui_core"):
        base = results[f"{name}_0cn"]["ms_per_step"]
        results[f"{name}_controlnet_overhead_ms_per_step"] = [
            round(results[f"{name}_{c}cn"]["ms_per_step"] - base, 1) for c in (1, 2)]
    report()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "controlnet_bench.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
