"""LoRA stack timing on the full FLUX.1-dev architecture (random weights initialised on the GPU): the time to
switch from one LoRA stack to another between two prompts, and the time per step with 0, 1 and 3 LoRAs, for
bf16 and fp8 weight storage; FluxWorks (FluxWorksApplyLoraStack + FluxWorksSampler) next to ComfyUI core's
LoraLoaderModelOnly path (`comfy.sd.load_lora_for_models` + `comfy.sample.sample`) in the same run.

LoRAs: random rank-16 (default) diffusers-format files on every attention and MLP layer (to_q/k/v, to_out,
add_q/k/v_proj, to_add_out, ff, ff_context; single blocks to_q/k/v, proj_mlp, proj_out).

A switch is timed from "the new stack is applied" to "the model is ready to sample": the apply step (reading
files, mapping keys; LoRA files are read once and cached by both) plus loading the patched model (merging). Each
switch also records the peak GPU memory it reached (allocator peak, reset before the switch).

fp8 storage is what FluxWorks' loader ships for `weight_dtype` fp8_e4m3fn on a bf16 file (flux_models: the
transformer built in the compute dtype, then `fp8_storage.keep_linear_weights_in`); core's is UNETLoader's
fp8_e4m3fn (`model_options` dtype).

Usage (repo root; ComfyUI and the package `fluxworks` come from PYTHONPATH, nothing edits sys.path):
  here:  PYTHONPATH=.comfyui .venv/bin/python bench/lora_gpu.py --tiny --comfy .comfyui
  GPU:   mkdir -p /tmp/pk && ln -sfn $PWD /tmp/pk/fluxworks && \\
         PYTHONPATH=/tmp/pk:/tmp/site:$PWD/.comfy python3 bench/lora_gpu.py --comfy .comfy
         [--steps 8] [--res 1024] [--rank 16] [--out DIR] [--sections ours,core] [--storages bf16,fp8_e4m3fn]
--tiny runs a 1-double-block model (24 heads, as core's loader requires) on the CPU to check the script.
Prints one JSON line per finished section; the last line is the whole summary (also written to DIR/lora_gpu.json).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--res", type=int, default=1024)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--comfy", default=".comfy")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--sections", default="ours,core")
ap.add_argument("--storages", default="bf16,fp8_e4m3fn")
args = ap.parse_args()
if args.tiny:
    args.res, args.steps = min(args.res, 64), min(args.steps, 2)
DEV = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
COMPUTE = torch.bfloat16 if DEV == "cuda" else torch.float32
R: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
           "res": args.res, "steps": args.steps, "rank": args.rank, "date": time.strftime("%Y-%m-%d")}

# ComfyUI as a library: its own argument parser reads sys.argv (--cpu for --tiny) when comfy.model_management is
# first imported, which importing anything under `fluxworks` does; so this comes first.
sys.argv = [sys.argv[0]] + (["--cpu"] if DEV == "cpu" else [])
try:
    import comfy.options
except ImportError as exc:
    raise SystemExit(f"ComfyUI is not importable: put its folder on PYTHONPATH (PYTHONPATH={args.comfy})") from exc

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from fluxworks.bench.report import check_comfy, write_report  # noqa: E402
from fluxworks.bench.report import sync as device_sync  # noqa: E402
from fluxworks.flux_models.dtypes import storage_and_compute  # noqa: E402
from fluxworks.flux_models.fp8_storage import keep_linear_weights_in  # noqa: E402
from fluxworks.flux_models.holders import FluxModel  # noqa: E402
from fluxworks.flux_models.transformer import build_transformer, infer_config  # noqa: E402
from fluxworks.nodes import host  # noqa: E402
from fluxworks.nodes.lora import FluxWorksApplyLoraStack  # noqa: E402
from fluxworks.nodes.sampler import FluxWorksSampler  # noqa: E402

check_comfy(args.comfy)

FLUX_CFG = dict(guidance_embeds=True)
TXT, POOL, TXT_TOKENS = 4096, 768, 512
if args.tiny:
    FLUX_CFG.update(num_layers=1, num_single_layers=0, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 56, 56))
    TXT, POOL, TXT_TOKENS = 32, 16, 16
LORA_LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "proj_mlp", "proj_out")


def emit() -> None:
    write_report(R, os.path.join(args.out, "lora_gpu.json"))


def sync() -> None:
    device_sync(DEV)


def peak_gib() -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if DEV == "cuda" else None


def new_peak_window(out: dict) -> None:
    """Start measuring a switch's own peak; the window that ends is folded into the section's peak_gib."""
    if DEV == "cuda":
        out["peak_gib"] = max(out.get("peak_gib", 0.0), peak_gib())
        torch.cuda.reset_peak_memory_stats()


def record_switch(out: dict, switches: list, tag: str, times: tuple[float, float, float], model, sample) -> None:
    """One switch to stack `tag` (times: before apply, after apply, model ready; the memory peak was reset before
    the apply), then a prompt with it: timed the first time a stack of that size is seen, else one step, so the
    next switch starts from this stack."""
    t0, t1, t2 = times
    switches.append({"to": tag, "apply_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3),
                     "total_s": round(t2 - t0, 3), "peak_gib": peak_gib()})
    count = str(len(STACKS[tag]))
    if count not in out["ms_per_step"]:
        out["ms_per_step"][count] = round(sample(model, args.steps) / args.steps * 1000, 1)
    else:
        sample(model, 1)


def free() -> None:
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def weight_bytes(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as raw bytes on the CPU (fp8 tensors have no torch.equal)."""
    return module.weight.detach().to("cpu", copy=True).view(torch.uint8)


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 2)


def random_weights() -> dict[str, torch.Tensor]:
    """A FLUX.1-dev-shaped diffusers state dict with random weights drawn on the GPU, kept on the CPU."""
    from diffusers import FluxTransformer2DModel

    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**FLUX_CFG).to(COMPUTE)
    state = {k: v.to("cpu") for k, v in model.state_dict().items()}
    R["params_B"] = round(sum(v.numel() for v in state.values()) / 1e9, 3)
    R["init_s"] = round(time.perf_counter() - t, 1)
    return state


def write_loras(state: dict[str, torch.Tensor], folder: str, count: int) -> list[str]:
    """`count` random diffusers-format LoRAs (`transformer.<layer>.lora_A/B.weight`) on every attention/MLP layer."""
    layers = sorted({k[: -len(".weight")] for k in state if k.endswith(".weight") and state[k].ndim == 2
                     and k[: -len(".weight")].endswith(LORA_LAYERS) and "blocks." in k})
    names = []
    for i in range(count):
        g = torch.Generator(DEV).manual_seed(100 + i)
        lora = {}
        for layer in layers:
            out, inp = state[layer + ".weight"].shape
            down = torch.randn(args.rank, inp, generator=g, device=DEV) * inp ** -0.5
            up = torch.randn(out, args.rank, generator=g, device=DEV) * 0.02
            lora[f"transformer.{layer}.lora_A.weight"] = down.to(torch.bfloat16).cpu()
            lora[f"transformer.{layer}.lora_B.weight"] = up.to(torch.bfloat16).cpu()
        name = f"bench_lora_{i}.safetensors"
        save_file(lora, os.path.join(folder, name))
        names.append(name)
    R["lora_layers"] = len(layers)
    R["lora_file_mb"] = round(os.path.getsize(os.path.join(folder, names[0])) / 2**20, 1)
    return names


STACKS = {"A1": [0], "B1": [1], "A3": [0, 2, 3], "B3": [1, 4, 5]}
# Stacks of successive prompts, each switch timed (base -> A1 first; the repeats show the steady state).
SEQUENCE = ("A1", "B1", "A3") if args.tiny else ("A1", "B1", "A1", "A3", "B3", "A3")


def conditioning():
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, TXT_TOKENS, TXT, generator=g)
    pooled = torch.randn(1, POOL, generator=g)
    return embeds, pooled


def ours_section(state: dict, loras: list[str], storage: str) -> dict:
    """FluxWorks: the loader's storage policy, our apply node, our sampler node."""
    out: dict = {}
    config = infer_config(state)
    transformer = build_transformer(dict(state), config, COMPUTE)
    if storage != "bf16":  # FluxWorksModelLoader's weight_dtype choice on a bf16 file (load_flux_transformer)
        stored, compute = storage_and_compute(storage, COMPUTE, COMPUTE)
        out["fp8_storage_linears"] = keep_linear_weights_in(transformer, stored, compute)
    base = host.wrap_patcher(FluxModel(transformer, config, COMPUTE, "random"), *host.model_devices())
    embeds, pooled = conditioning()
    positive = [[embeds, {"pooled_output": pooled}]]
    latent = {"samples": torch.zeros(1, 16, args.res // 8, args.res // 8)}
    sampler, apply_node = FluxWorksSampler(), FluxWorksApplyLoraStack()

    def sample(patcher, steps: int) -> float:
        sync()
        t = time.perf_counter()
        sampler.sample(patcher, positive, latent, 42, steps, 3.5, 0.0, 1.0)
        sync()
        return time.perf_counter() - t

    to_q = transformer.transformer_blocks[0].attn.to_q
    original = weight_bytes(to_q)
    t = time.perf_counter()
    host.load_on_device(base)
    out["first_load_s"] = round(time.perf_counter() - t, 2)
    sample(base, 1)
    out["ms_per_step"] = {"0": round(sample(base, args.steps) / args.steps * 1000, 1)}
    switches = []
    for tag in SEQUENCE:
        stack = [(loras[i], 1.0, 1.0) for i in STACKS[tag]]
        sync()
        new_peak_window(out)
        t0 = time.perf_counter()
        patched = apply_node.apply(base, stack)["result"][0]
        t1 = time.perf_counter()
        host.load_on_device(patched)
        sync()
        t2 = time.perf_counter()
        record_switch(out, switches, tag, (t0, t1, t2), patched, sample)
    sync()
    new_peak_window(out)
    t0 = time.perf_counter()
    empty = apply_node.apply(base, [])["result"][0]
    host.load_on_device(empty)
    sync()
    switches.append({"to": "no LoRA (empty stack)", "total_s": round(time.perf_counter() - t0, 3),
                     "peak_gib": peak_gib()})
    out["restored_exactly"] = bool(torch.equal(weight_bytes(to_q), original))
    on_device = sum(b.weight.numel() * b.weight.element_size() for b in base.backup.values()
                    if b.weight.device.type != "cpu")
    out["originals_kept_on_device_gib"] = gib(on_device)
    out["switches"] = switches
    new_peak_window(out)  # the section's peak_gib: over every window
    del base, empty, patched, transformer, to_q
    free()
    return out


def core_section(state: dict, loras: list[str], folder: str, storage: str) -> dict:
    """ComfyUI core: UNETLoader's model from the same weights, LoraLoaderModelOnly's comfy.sd.load_lora_for_models."""
    out: dict = {}
    opts = {} if storage == "bf16" else {"dtype": getattr(torch, storage.replace("fp8_", "float8_"))}
    t = time.perf_counter()
    base = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options=opts)
    out["build_s"] = round(time.perf_counter() - t, 1)
    embeds, pooled = conditioning()
    pos = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    neg = [[torch.zeros_like(embeds), {"pooled_output": torch.zeros_like(pooled)}]]
    lat = torch.zeros(1, 16, args.res // 8, args.res // 8)
    noise = comfy.sample.prepare_noise(lat, 42)

    def sample(model, steps: int) -> float:
        sync()
        t = time.perf_counter()
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", pos, neg, lat, disable_pbar=True)
        sync()
        return time.perf_counter() - t

    t = time.perf_counter()
    mm.load_models_gpu([base])
    out["first_load_s"] = round(time.perf_counter() - t, 2)
    sample(base, 1)
    out["ms_per_step"] = {"0": round(sample(base, args.steps) / args.steps * 1000, 1)}
    files: dict[str, dict] = {}  # LoraLoader keeps its last file in memory too
    switches = []
    for tag in SEQUENCE:
        sync()
        new_peak_window(out)
        t0 = time.perf_counter()
        model = base
        for i in STACKS[tag]:
            if loras[i] not in files:
                files[loras[i]] = comfy.utils.load_torch_file(os.path.join(folder, loras[i]), safe_load=True)
            model, _ = comfy.sd.load_lora_for_models(model, None, files[loras[i]], 1.0, 0.0)
        t1 = time.perf_counter()
        mm.load_models_gpu([model])
        sync()
        t2 = time.perf_counter()
        record_switch(out, switches, tag, (t0, t1, t2), model, sample)
    sync()
    new_peak_window(out)
    t0 = time.perf_counter()
    mm.load_models_gpu([base])
    sync()
    switches.append({"to": "no LoRA (base model)", "total_s": round(time.perf_counter() - t0, 3),
                     "peak_gib": peak_gib()})
    out["switches"] = switches
    new_peak_window(out)  # the section's peak_gib: over every window
    del base, model
    free()
    return out


def main() -> None:
    os.makedirs(args.out, exist_ok=True)
    state = random_weights()
    folder = tempfile.mkdtemp(prefix="lora_gpu_")
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    t = time.perf_counter()
    loras = write_loras(state, folder, 6)
    R["write_loras_s"] = round(time.perf_counter() - t, 1)
    # FluxWorksApplyLoraStack runs with its default: originals kept on the GPU up to this fraction of the model
    R["switch_vram"] = FluxWorksApplyLoraStack.INPUT_TYPES()["optional"]["switch_vram"][1]["default"]
    emit()
    sections = args.sections.split(",")
    for storage in args.storages.split(","):
        for section in ("ours", "core"):
            if section not in sections:
                continue
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            key = f"{section}_{storage}"
            try:
                R[key] = (ours_section(state, loras, storage) if section == "ours"
                          else core_section(state, loras, folder, storage))
            except Exception as exc:  # noqa: BLE001 - a failed section is recorded and the run goes on
                R[key + "_error"] = repr(exc)[:600]
                free()
            emit()
    R["summary"] = {key: {"ms_per_step": value["ms_per_step"],
                          "switch_s": [[s["to"], s["total_s"]] for s in value["switches"]],
                          "switch_peak_gib": [s["peak_gib"] for s in value["switches"]]}
                    for key, value in R.items() if isinstance(value, dict) and "switches" in value}
    emit()


if __name__ == "__main__":
    with torch.inference_mode():  # as ComfyUI runs every node
        main()
