"""GPU memory and time of LoRA stack switches against the fast-switch budget (FluxWorksApplyLoraStack's
`switch_vram`, the fraction of the model's size that may keep original weights on the GPU).

Full FLUX.1-dev architecture with random weights initialised on the GPU, stored in bf16 and in the loader's fp8
storage (`flux_models.fp8_storage`, what FluxWorks Load FLUX.1 Model ships). LoRAs: random rank-16 diffusers-format
files on every attention and MLP layer (the layers most trained LoRAs cover). For each storage and fraction, from the
base model loaded on the GPU, the stacks A1 -> B1 -> A2 -> B2 -> A2 -> none are applied and loaded in turn (A/B:
different LoRAs, 1 or 2 per stack), each switch timed from applying the stack until the model is loaded, through
the node classes. Recorded: the budget, the originals kept on the GPU after each switch (as the patcher counts them
and as their tensors' devices say), the memory allocated then, the peak allocated over the whole sequence
(`max_memory_allocated` after a reset with the base model loaded; no sampling, so activations come on top, the same
with or without LoRAs), the model's own size, and that the last switch restores the base weights bit for bit.

Usage (repo root; ComfyUI, the pack as `fluxworks` and `bench` importable through PYTHONPATH):
    python bench/lora_switch_memory.py [--tiny] [--fractions 0,0.1,0.25,1] [--storages bf16,fp8_e4m3fn]
                                       [--rank 16] [--out DIR]
--tiny runs a 1+1-block model on the CPU to check the script (there, CPU and GPU memory are the same).
One JSON line per finished section on stdout; the whole report also goes to DIR/lora_switch_memory.json.
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

from bench.report import sync as device_sync
from bench.report import write_report

ap = argparse.ArgumentParser()
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--fractions", default="0,0.1,0.25,1")
ap.add_argument("--storages", default="bf16,fp8_e4m3fn")
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--out", default=os.environ.get("OUT", "."))
args = ap.parse_args()
DEV = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
COMPUTE = torch.bfloat16 if DEV == "cuda" else torch.float32
sys.argv = [sys.argv[0]] + (["--cpu"] if DEV == "cpu" else [])  # ComfyUI parses its own command line
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402

from fluxworks.flux_models.fp8_storage import keep_linear_weights_in  # noqa: E402
from fluxworks.flux_models.holders import FluxModel  # noqa: E402
from fluxworks.flux_models.transformer import build_transformer, infer_config  # noqa: E402
from fluxworks.nodes import host  # noqa: E402
from fluxworks.nodes.lora import FluxWorksApplyLoraStack  # noqa: E402

FLUX_CFG: dict = {"guidance_embeds": True}
if args.tiny:
    FLUX_CFG.update(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 24, 24))
LORA_LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "proj_mlp", "proj_out")
STACKS = {"A1": [0], "B1": [1], "A2": [0, 2], "B2": [1, 3]}
SEQUENCE = ("A1", "B1", "A2", "B2", "A2")
R: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
           "rank": args.rank, "date": time.strftime("%Y-%m-%d")}


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 2)


def random_state() -> dict[str, torch.Tensor]:
    """FLUX.1-dev-shaped diffusers weights drawn on the GPU, kept on the CPU (the loader's starting point)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        model = FluxTransformer2DModel(**FLUX_CFG).to(COMPUTE)
    state = {k: v.to("cpu") for k, v in model.state_dict().items()}
    R["params_B"] = round(sum(v.numel() for v in state.values()) / 1e9, 3)
    return state


def write_loras(state: dict[str, torch.Tensor], folder: str, count: int) -> list[str]:
    layers = sorted({k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2
                     and k[: -len(".weight")].endswith(LORA_LAYERS) and "blocks." in k})
    names = []
    for i in range(count):
        g = torch.Generator(DEV).manual_seed(100 + i)
        lora = {}
        for layer in layers:
            out, inp = state[layer + ".weight"].shape
            lora[f"transformer.{layer}.lora_A.weight"] = (torch.randn(args.rank, inp, generator=g, device=DEV)
                                                          * inp ** -0.5).to(torch.bfloat16).cpu()
            lora[f"transformer.{layer}.lora_B.weight"] = (torch.randn(out, args.rank, generator=g, device=DEV)
                                                          * 0.02).to(torch.bfloat16).cpu()
        names.append(f"switch_lora_{i}.safetensors")
        save_file(lora, os.path.join(folder, names[-1]))
    R["lora_layers"] = len(layers)
    return names


def original_bytes_on(device_type: str, patcher) -> int:
    return sum(b.weight.numel() * b.weight.element_size() for b in patcher.backup.values()
               if b.weight.device.type == device_type)


def storage_section(state: dict, loras: list[str], storage: str, fractions: list[float]) -> dict:
    config = infer_config(state)
    transformer = build_transformer(dict(state), config, COMPUTE)
    if storage != "bf16":
        keep_linear_weights_in(transformer, getattr(torch, storage.replace("fp8_", "float8_")), COMPUTE)
    base = host.wrap_patcher(FluxModel(transformer, config, COMPUTE, "random"), mm.get_torch_device(),
                             mm.unet_offload_device())
    host.load_on_device(base)
    probe = transformer.transformer_blocks[0].attn.to_q
    original = probe.weight.detach().to("cpu", copy=True).view(torch.uint8)
    out: dict = {"model_gib": gib(base.model_size()), "fractions": {}}
    node = FluxWorksApplyLoraStack()
    for fraction in fractions:
        device_sync(DEV)
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if DEV == "cuda" else 0
        switches = []
        for tag in (*SEQUENCE, "none"):
            stack = [(loras[i], 1.0, 1.0) for i in STACKS.get(tag, [])]
            device_sync(DEV)
            t = time.perf_counter()
            patched = node.apply(base, stack, switch_vram=fraction)["result"][0]
            host.load_on_device(patched)
            device_sync(DEV)
            switches.append({"to": tag, "s": round(time.perf_counter() - t, 3),
                             "kept_gib": gib(patched.originals_on_device()),
                             "kept_on_gpu_gib": gib(original_bytes_on("cuda", base)),
                             "in_cpu_memory_gib": gib(original_bytes_on("cpu", base)),
                             "allocated_gib": gib(torch.cuda.memory_allocated()) if DEV == "cuda" else None})
        row = {"budget_gib": gib(fraction * base.model_size()), "start_allocated_gib": gib(start),
               "restored_exactly": bool(torch.equal(probe.weight.detach().to("cpu").view(torch.uint8), original)),
               "switches": switches}
        if DEV == "cuda":
            row["peak_gib"] = gib(torch.cuda.max_memory_allocated())
        out["fractions"][str(fraction)] = row
        print(f"{storage} switch_vram={fraction}: peak {row.get('peak_gib')} GiB, kept on GPU "  # noqa: T201
              f"{max(s['kept_on_gpu_gib'] for s in switches)} GiB, switches "
              f"{[s['s'] for s in switches]} s, restored {row['restored_exactly']}", flush=True)
    del base, patched, transformer, probe
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    return out


def main() -> None:
    os.makedirs(args.out, exist_ok=True)
    t = time.perf_counter()
    state = random_state()
    folder = tempfile.mkdtemp(prefix="lora_switch_")
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    loras = write_loras(state, folder, 4)
    R["setup_s"] = round(time.perf_counter() - t, 1)
    fractions = [float(f) for f in args.fractions.split(",")]
    for storage in args.storages.split(","):
        t = time.perf_counter()
        R[storage] = storage_section(state, loras, storage, fractions)
        R[storage]["section_s"] = round(time.perf_counter() - t, 1)
        write_report(R, os.path.join(args.out, "lora_switch_memory.json"))


if __name__ == "__main__":
    with torch.inference_mode():  # as ComfyUI runs every node
        main()
