"""FluxWorks speed benchmark: the FluxWorks Sampler's own path in each speed mode next to diffusers eager and a
plain ComfyUI core bf16 run, in one process on one card, on the full FLUX.1 architecture with random weights
initialised on the GPU.

Why it exists next to bench/node_bench.py: node_bench times what a user gets from the nodes and owns the core
baselines (core's best mode, TorchCompileModel, EasyCache, LazyCache); this script sweeps the speed options one at
a time (fp8 scalings and variants, step-cache settings, batch sizes, memory caps with block offload) and records
what each needs to be judged: final-latent error against our bf16 eager run, prepare time, step-cache counts,
a kernel profile.

Every FluxWorks row is what `sample_prepared` runs for the node: `prepare(loaded model, SpeedOptions, ...)` with
ComfyUI's own interrupt check (the node's per-block cancel check), then runs of `sample_flux(prepared.model,
scope=prepared.evaluation)` inside `prepared.run()`, then `prepared.close()`. One prepared transformer serves a
row's warm-up run and its timed run (the node prepares once per prompt; `<row>_prepare_s` is that cost). Keys
per row `<row>_...`: options (dataclasses.asdict of its SpeedOptions), prepare_s, fp8_linears (how many linears
`prepare` made fp8: 0 where the device has no fp8 matmul), warmup_s, ms_per_step, peak_gib, rel_err_vs_bf16; a
step-cache row adds cache (hits, misses, reused_steps from `prepared.cache`, and the measured first-block change).
Peak GiB includes the loaded bf16 transformer the prepared one is made from: the node keeps it loaded too.

Sections (`--sections`, comma-separated; `all` = every section but fp8_variants):
  diffusers       FluxPipeline eager on the same weights and noise
  compile         bf16 + regional compile (the no-Speed-node default on CUDA)
  cache           a probe row (bf16 + compile, every step compared, nothing reused: the first-block change per
                  step and the hooks' cost), and one row per --cache-configs entry on the fastest fp8 mode
  fp8, fp8_rowwise, fp8_tensorwise   fp8 matmul + compile per scaling (rowwise also eager); `fp8` = both
  fp8_variants    (opt-in: minutes of compiling) compiled rowwise fp8 without fast accumulation, then with each
                  --fp8-variants option, then the options that were faster, together (keys ours_fp8v_*)
  batch           images/s at batch 1, 2, 4 on the fastest fp8 mode
  memory          the fastest fp8 mode under 16 and 8 GiB caps, with block offload (SpeedOptions
                  offload_resident_blocks = the blocks that fit); CUDA only
  offload_node    the FluxWorks Speed defaults with offload_resident_blocks = --offload-resident, under 8 GiB
  comfy_bf16      core's native bf16 model through comfy.sample.sample: a plain reference row, not core's best
                  mode (that is in bench/node_bench.py)
  e2e             FLUX.1-schnell image time split into text encode, prepare, 4 denoise steps, VAE decode
`--profile` profiles one steady step of the fastest fp8 mode (and of the fastest fp8 variant) with torch.profiler.
Our bf16 eager row (the error reference) always runs. Sections derived from "the fastest fp8 mode" use bf16 +
compile when no fp8 section ran.

Usage (repo root; ComfyUI and the package `fluxworks` come from PYTHONPATH, nothing edits sys.path):
  here:  PYTHONPATH=.comfyui .venv/bin/python bench/speed_bench.py --tiny --comfy .comfyui --sections all
  GPU:   mkdir -p /tmp/pk && ln -sfn $PWD /tmp/pk/fluxworks && \\
         PYTHONPATH=/tmp/pk:/tmp/site:$PWD/.comfy python3 bench/speed_bench.py --comfy .comfy
         [--steps 28] [--res 1024] [--out DIR] [--sections all] [--cache-configs "0.6:0.1:0.9:3,..."]
         [--fp8-variants fast_accum,calibrated,calibrated_tensorwise,tuned] [--offload-resident 12] [--profile]
--tiny runs a 1+1-block model on the CPU (64x64, 6 steps unless given) to check the script end to end; the CPU
has no fp8 matmul and `prepare` skips compile there, so its fp8 and compile rows run the eager model (their
fp8_linears say so). Prints one JSON line per finished row; the last line is the whole report (also written to
DIR/flux_speed.json).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import traceback
from dataclasses import asdict, replace

import torch

SECTIONS = ("diffusers", "compile", "cache", "fp8", "fp8_rowwise", "fp8_tensorwise", "fp8_variants", "batch",
            "memory", "offload_node", "comfy_bf16", "e2e")
OPT_IN_SECTIONS = frozenset({"fp8_variants"})  # minutes of compiling (kernel tuning): not part of "all"
REMOVED_SECTIONS = {"comfy": "core's fp8 and compiled baselines are timed through core's own nodes by "
                             "bench/node_bench.py; use the section comfy_bf16 for the plain core bf16 row here"}
# SpeedOptions fields each fp8 variant sets over the compiled rowwise baseline. The baseline has fast
# accumulation off (SpeedOptions' default is on), so the fast_accum row shows what it adds.
FP8_VARIANTS = {
    "fast_accum": {"fp8_fast_accum": True},
    "calibrated": {"fp8_activations": "calibrated"},
    # tensorwise weights: cuBLAS's fastest fp8 GEMM, bias in its epilogue; the global amax that makes dynamic
    # tensorwise slower is what calibration removes
    "calibrated_tensorwise": {"fp8_activations": "calibrated", "fp8_scaling": "tensorwise"},
    "tuned": {"tune_kernels": True},
}
FP8_VARIANT_BASELINE = "ours_fp8v_rowwise_compile"
FP8_MODES = {"rowwise": "ours_fp8_attn_compile", "tensorwise": "ours_fp8_tensorwise_attn_compile"}
CACHE_PROBE_THRESHOLD = 1e-6  # compares every step; a first block changing by less than this is never seen
MEMORY_CAPS_GIB = (16, 8)
ACTIVATION_RESERVE_GIB = 3.0  # activations of a 1024^2 batch-1 step, kept free under a memory cap
KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
                ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "cublas", "scaled_mm")),
                ("inductor fused (norm, modulation, fp8 quantise, rope)", ("triton",)))
REFERENCE = "ours_eager_bf16"


# --- command line (pure: no ComfyUI, no fluxworks) ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="1+1 blocks on the CPU, to check the script")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (GPU) / 6 (--tiny)")
    ap.add_argument("--res", type=int, default=None, help="square image size; default 1024 (GPU) / 64 (--tiny)")
    ap.add_argument("--comfy", default=".comfy", help="ComfyUI folder; must be the one on PYTHONPATH")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", default="all", help=f"all or a comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--cache-configs", default="0.1:0.1:0.9:3,0.3:0.1:0.9:3,0.6:0.1:0.9:3",
                    help="step-cache rows on the fastest fp8 mode, threshold:start:end:max_consecutive, "
                         "comma-separated ('' for none)")
    ap.add_argument("--fp8-variants", default=",".join(FP8_VARIANTS),
                    help="fp8_variants section: which options to time alone next to the rowwise baseline, "
                         "comma-separated")
    ap.add_argument("--offload-resident", type=int, default=12,
                    help="offload_node section: blocks kept on the GPU (the FluxWorks Speed offload_resident_blocks)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one steady step of the fastest fp8 mode with torch.profiler (top-15 kernels)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (6 if args.tiny else 28)
    args.res = args.res if args.res is not None else (64 if args.tiny else 1024)
    if args.steps < 3 or args.res < 16 or args.res % 16:
        ap.error(f"--steps must be at least 3 (the step-cache rows warm up with 3) and --res a multiple of 16, got "
                 f"--steps {args.steps} --res {args.res}")
    if args.offload_resident < 0:
        ap.error(f"--offload-resident is a block count (0 or more), got {args.offload_resident}")
    try:
        args.sections = parse_sections(args.sections)
        args.fp8_variants = parse_fp8_variants(args.fp8_variants)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def parse_sections(text: str) -> frozenset[str]:
    chosen = frozenset(part.strip() for part in text.split(",") if part.strip())
    for name in chosen & REMOVED_SECTIONS.keys():
        raise ValueError(f"--sections {name}: removed ({REMOVED_SECTIONS[name]})")
    unknown = chosen - set(SECTIONS) - {"all"}
    if unknown or not chosen:
        raise ValueError(f"--sections: unknown {sorted(unknown) or repr(text)}; choose all or from {', '.join(SECTIONS)}")
    return chosen


def wants(sections: frozenset[str], name: str) -> bool:
    return name in sections or ("all" in sections and name not in OPT_IN_SECTIONS)


def parse_cache_configs(text: str) -> list:
    """--cache-configs -> StepCacheConfig list (imports fluxworks: call after `start_comfy`)."""
    from fluxworks.flux_speed.step_cache import StepCacheConfig

    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        if len(fields) != 4:
            raise ValueError(f"--cache-configs wants threshold:start:end:max_consecutive per entry, got {item!r}")
        try:
            configs.append(StepCacheConfig(float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])))
        except ValueError as exc:
            raise ValueError(f"--cache-configs {item!r}: {exc}") from exc
    return configs


def parse_fp8_variants(text: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(chosen) - FP8_VARIANTS.keys())
    if unknown:
        raise ValueError(f"--fp8-variants: unknown {unknown}; choose from {', '.join(FP8_VARIANTS)}")
    return chosen


# --- pure helpers --------------------------------------------------------------------------------------------------

def cache_tag(mode_tag: str, config) -> str:
    return (f"{mode_tag}_cache{config.threshold:g}_{config.start_percent:g}-{config.end_percent:g}"
            f"_max{config.max_consecutive}")


def faster_variants_together(timed_ms: dict[str, float], baseline_ms: float) -> dict:
    """The SpeedOptions fields of every variant that beat the baseline, merged slowest first, so where two
    variants set one field the faster one's value wins."""
    merged: dict = {}
    for name in sorted((n for n, ms in timed_ms.items() if ms < baseline_ms), key=lambda n: -timed_ms[n]):
        merged.update(FP8_VARIANTS[name])
    return merged


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fp8_block_bytes(block: torch.nn.Module) -> int:
    """Bytes of `block` once `quantize_transformer_linears` has swapped its linears: every nn.Linear weight at one
    byte per element plus a float32 scale per output row (rowwise, the larger of the two scalings), everything
    else (biases, norms) as it is stored now."""
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    weights = {id(m.weight) for m in linears}
    rest = [t for t in list(block.parameters()) + list(block.buffers()) if id(t) not in weights]
    return sum(m.weight.numel() + 4 * m.out_features for m in linears) + tensor_bytes(rest)


def resident_blocks(block_bytes: list[int], fixed_bytes: int, cap_bytes: int, reserve_bytes: int) -> int:
    """How many leading blocks stay on the GPU under `cap_bytes`: what is left after the parts that are always
    there (`fixed_bytes`: embedders and output layers), the activations (`reserve_bytes`) and three streamed
    blocks in flight (the one computing, the one being fetched, the one being freed)."""
    if not block_bytes:
        return 0
    budget = cap_bytes - fixed_bytes - reserve_bytes - 3 * max(block_bytes)
    resident, used = 0, 0
    while resident < len(block_bytes) and used + block_bytes[resident] <= budget:
        used += block_bytes[resident]
        resident += 1
    return resident


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def change_summary(changes: list[float]) -> dict:
    ordered = sorted(changes)
    if not ordered:
        return {}
    return {"count": len(ordered), "min": round(ordered[0], 4), "median": round(ordered[len(ordered) // 2], 4),
            "max": round(ordered[-1], 4)}


def cache_record(cache) -> dict:
    """What a prepared transformer's step cache did in its last run."""
    return {"hits": cache.hits, "misses": cache.misses, "reused_steps": list(cache.reused_steps),
            "change": change_summary(cache.changes)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.double() - b.double()).norm() / b.double().norm()), 5)


def options_record(options) -> dict:
    return asdict(options)


def start_comfy(folder: str, device: str) -> None:
    """ComfyUI as a library, set up as its launcher does: its argument parser reads sys.argv (--cpu for the CPU)
    when comfy.model_management is first imported, which importing anything under `fluxworks` does; so this runs
    before any of those imports."""
    sys.argv = [sys.argv[0]] + (["--cpu"] if device == "cpu" else [])
    try:
        import comfy.options
    except ImportError as exc:
        raise SystemExit(f"ComfyUI is not importable: put its folder on PYTHONPATH (PYTHONPATH={folder})") from exc
    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401 - parses the arguments set above

    from fluxworks.bench.report import check_comfy

    check_comfy(folder)


# --- the benchmark -------------------------------------------------------------------------------------------------

class SpeedBench:
    """One run: the shared weights and inputs, then the sections in order; `report` is written after every row."""

    def __init__(self, args: argparse.Namespace) -> None:
        import comfy.model_management as mm

        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.interrupt = mm.throw_exception_if_processing_interrupted  # what FluxWorksSampler passes to prepare
        self.started = time.perf_counter()
        self.report: dict = {
            "device": torch.cuda.get_device_name() if self.cuda else "cpu", "torch": torch.__version__,
            "steps": args.steps, "res": args.res, "date": time.strftime("%Y-%m-%d"),
            "path": "prepare + prepared.run() + sample_flux(scope=prepared.evaluation), as sample_prepared",
            "peak_note": "peak GiB includes the loaded bf16 transformer each prepared one is made from"}
        self.flux_config = dict(guidance_embeds=True)
        self.text_width, self.pooled_width, text_tokens = 4096, 768, 512
        if args.tiny:
            self.flux_config.update(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
                                    joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 56, 56))
            self.text_width, self.pooled_width, text_tokens = 32, 16, 16
            self.report["tiny_note"] = ("CPU: no fp8 matmul and no compile in prepare, so fp8 and compile rows run "
                                        "the eager model; this checks the script, not the modes")
        torch.manual_seed(1)
        self.embeds = torch.randn(1, text_tokens, self.text_width, device=self.device, dtype=self.dtype)
        self.pooled = torch.randn(1, self.pooled_width, device=self.device, dtype=self.dtype)
        self.lat = args.res // 8
        self.flux = None
        self.reference = None

    # -- plumbing --

    def emit(self) -> None:
        from fluxworks.bench.report import write_report

        write_report(self.report, os.path.join(self.args.out, "flux_speed.json"))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak(self) -> float:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else 0.0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def recorded(self, tag: str):
        """Run one row; a failure is recorded as `<tag>_error` (traceback on stderr) and the run goes on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a failed mode is reported in the JSON, not hidden
            traceback.print_exc()
            self.report[tag + "_error"] = repr(exc)[:400]
            self.emit()

    @contextlib.contextmanager
    def memory_cap(self, gib: float):
        """Limit this process's CUDA allocator to `gib` (no-op on the CPU)."""
        if not self.cuda:
            yield
            return
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total), self.device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    @contextlib.contextmanager
    def host_offloaded(self, model: torch.nn.Module):
        """Where the host leaves a loaded model when block offload is on (nodes/host.py streamed_on_device): the
        blocks in CPU memory, only the embedders and output layers on the device. Back on the device afterwards."""
        blocks = ("transformer_blocks", "single_transformer_blocks")
        for name, child in model.named_children():
            child.to("cpu" if name in blocks else self.device)
        self.free()
        try:
            yield
        finally:
            model.to(self.device)
            self.free()

    def new_flux(self, variant: str = "dev", **overrides):
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        config = {**self.flux_config, "guidance_embeds": variant == "dev", **overrides}
        with torch.device(self.device):
            return FluxTransformer2DModel(**config).to(self.dtype).eval().requires_grad_(False)

    # -- sampling: one run of a prepared transformer, as sample_prepared runs it --

    def sample(self, prepared, steps: int, batch: int = 1, guidance_embeds: bool = True, positive=None,
               curve=None, callback=None) -> tuple[float, torch.Tensor]:
        """(ms/step, final VAE-space latent) of one sampling run of `prepared`."""
        from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, calculate_mu, get_sigmas, sample_flux
        from fluxworks.flux_sampler.latents import make_noise, to_vae_space
        from fluxworks.flux_sampler.schedule import image_seq_len

        shape = (batch, 16, self.lat, self.lat)
        mu = calculate_mu(image_seq_len(self.lat, self.lat)) if guidance_embeds else None
        sigmas = get_sigmas(steps, mu).to(self.device)
        noise = make_noise(shape, 42).to(self.device)
        positive = positive if positive is not None else TextConditioning(self.embeds, self.pooled)
        self.sync()
        start = time.perf_counter()
        with prepared.run():
            x, _ = sample_flux(prepared.model, guidance_embeds, positive, None, torch.zeros(shape, device=self.device),
                               noise, sigmas, curve or GuidanceCurve.constant(3.5), self.dtype, callback=callback,
                               scope=prepared.evaluation)
        self.sync()
        return round((time.perf_counter() - start) / steps * 1000, 2), to_vae_space(x)

    def prepare_row(self, tag: str, options, source: torch.nn.Module | None = None):
        """`prepare` for one row, timed; records the options and how many linears became fp8."""
        from fluxworks.flux_speed.fp8_linear import Fp8Linear
        from fluxworks.flux_speed.prepare import prepare

        self.report[tag + "_options"] = options_record(options)
        self.free()
        self.sync()
        start = time.perf_counter()
        prepared = prepare(source if source is not None else self.flux, options, self.device, self.dtype,
                           interrupt=self.interrupt)
        self.sync()
        self.report[tag + "_prepare_s"] = round(time.perf_counter() - start, 2)
        self.report[tag + "_fp8_linears"] = sum(isinstance(m, Fp8Linear) for m in prepared.model.modules())
        return prepared

    def time_row(self, tag: str, prepared, warm_steps: int = 2) -> torch.Tensor:
        """Warm-up run (compiles, calibrates), then the timed --steps run; records time, peak, error, cache."""
        start = time.perf_counter()
        self.sample(prepared, warm_steps)
        self.report[tag + "_warmup_s"] = round(time.perf_counter() - start, 1)
        self.reset_peak()
        ms, latent = self.sample(prepared, self.args.steps)
        self.report[tag + "_ms_per_step"] = ms
        self.report[tag + "_peak_gib"] = self.peak()
        if self.reference is not None:
            self.report[tag + "_rel_err_vs_bf16"] = rel(latent, self.reference)
        if prepared.cache is not None:
            self.report[tag + "_cache"] = cache_record(prepared.cache)
        self.emit()
        return latent

    def row(self, tag: str, options, warm_steps: int = 2, source: torch.nn.Module | None = None):
        """One FluxWorks row: prepare, warm up, time, close. Returns the final latent, or None if it failed."""
        with self.recorded(tag):
            prepared = self.prepare_row(tag, options, source)
            try:
                return self.time_row(tag, prepared, warm_steps)
            finally:
                prepared.close()
        return None

    # -- sections --

    def matmul_tflops(self) -> None:
        a = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16)
        b = torch.randn_like(a)
        for _ in range(3):
            a @ b
        self.sync()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        self.sync()
        self.report["bf16_matmul_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, 1)

    def diffusers_eager(self) -> torch.Tensor:
        """FluxPipeline eager on the loaded weights, from the same noise. The pipeline gets its own structural clone
        (same tensors): its `transformer.cache_context` puts a diffusers hook registry on the transformer it runs,
        and `prepare`'s clones of a model carrying one would share it (hooks meant for a clone would land on the
        loaded model)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from fluxworks.flux_sampler.latents import make_noise, pack, to_vae_space, unpack
        from fluxworks.flux_speed.prepare import clone_structure

        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=clone_structure(self.flux))
        pipe.set_progress_bar_config(disable=True)
        start = pack(make_noise((1, 16, self.lat, self.lat), 42)).to(self.device, self.dtype)

        def run(steps: int):
            return pipe(prompt_embeds=self.embeds, pooled_prompt_embeds=self.pooled, height=self.args.res,
                        width=self.args.res, num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                        latents=start).images

        run(2)
        self.reset_peak()
        self.sync()
        t = time.perf_counter()
        latent = run(self.args.steps)
        self.sync()
        self.report["diffusers_eager_ms_per_step"] = round((time.perf_counter() - t) / self.args.steps * 1000, 2)
        self.report["diffusers_eager_peak_gib"] = self.peak()
        self.emit()
        return to_vae_space(unpack(latent.float(), self.lat, self.lat))

    def cache_probe(self) -> None:
        """bf16 + compile with a cache that compares every step and reuses none: the first block's change per
        step (what a threshold is chosen against) and what the cache hooks cost when they skip nothing."""
        from fluxworks.flux_speed.prepare import SpeedOptions
        from fluxworks.flux_speed.step_cache import StepCacheConfig

        tag = "ours_bf16_attn_compile_cache_probe"
        config = StepCacheConfig(CACHE_PROBE_THRESHOLD, 0.0, 1.0, max_consecutive=1)
        if self.row(tag, SpeedOptions(compile=True, cache=config)) is not None:
            self.report["first_block_change_per_step"] = self.report[tag + "_cache"]["change"]
            self.emit()

    def fp8_section(self):
        """fp8 matmul + compile per chosen scaling (rowwise also eager); returns (tag, options) of the fastest."""
        from fluxworks.flux_speed.prepare import SpeedOptions

        sections = self.args.sections
        scalings = [s for s in ("rowwise", "tensorwise") if wants(sections, "fp8") or wants(sections, "fp8_" + s)]
        timed = {}
        for scaling in scalings:
            if scaling == "rowwise":
                self.row("ours_fp8_attn", SpeedOptions(fp8_matmul=True))
            options = SpeedOptions(compile=True, fp8_matmul=True, fp8_scaling=scaling)
            if self.row(FP8_MODES[scaling], options) is not None:
                timed[FP8_MODES[scaling]] = options
        if not timed:
            return None
        fastest = min(timed, key=lambda tag: self.report[tag + "_ms_per_step"])
        self.report["fp8_fastest_mode"] = fastest
        self.emit()
        return fastest, timed[fastest]

    def cache_rows(self, mode_tag: str, options) -> None:
        """One row per --cache-configs entry on `options`: ms/step, the cache's counts, final-latent error."""
        self.report.setdefault("cache_rows", [])
        for config in self.args.cache_configs:
            tag = cache_tag(mode_tag, config)
            self.row(tag, replace(options, cache=config), warm_steps=3)
            row = {"mode": mode_tag, "key": tag, "threshold": config.threshold, "start": config.start_percent,
                   "end": config.end_percent, "max_consecutive": config.max_consecutive, "steps": self.args.steps}
            cache = self.report.get(tag + "_cache")
            if cache is not None:
                row.update(hits=cache["hits"], misses=cache["misses"], reused_steps=cache["reused_steps"],
                           steps_reused=len(cache["reused_steps"]))
            for field in ("ms_per_step", "rel_err_vs_bf16", "error"):
                if f"{tag}_{field}" in self.report:
                    row[field] = self.report[f"{tag}_{field}"]
            self.report["cache_rows"].append(row)
            self.emit()

    def batch_rows(self, mode_tag: str, options) -> None:
        """Images per second at batch 1, 2 and 4 on one prepared transformer (warm-up run per batch size)."""
        self.report["batch_mode"] = mode_tag
        with self.recorded(mode_tag + "_batch"):
            prepared = self.prepare_row(mode_tag + "_batch", options)
            try:
                for batch in (1, 2, 4):
                    self.sample(prepared, 2, batch=batch)
                    ms, _ = self.sample(prepared, self.args.steps, batch=batch)
                    self.report[f"{mode_tag}_batch{batch}_images_per_s"] = round(
                        1000 / (ms * self.args.steps) * batch, 3)
                    self.emit()
            finally:
                prepared.close()

    def memory_rows(self, options) -> None:
        """`options` with block offload under 16 and 8 GiB caps: the loaded model's blocks in CPU memory (as the
        host leaves them), the first N blocks resident, N the most that fit (fp8 block sizes when fp8 applies)."""
        from fluxworks.flux_speed.fp8_linear import fp8_matmul_supported
        from fluxworks.flux_speed.prepare import transformer_blocks

        blocks = transformer_blocks(self.flux)
        fp8 = options.fp8_matmul and fp8_matmul_supported(self.device)
        sizes = [fp8_block_bytes(b) if fp8 else tensor_bytes(list(b.parameters()) + list(b.buffers()))
                 for b in blocks]
        in_blocks = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
        fixed = tensor_bytes(t for t in list(self.flux.parameters()) + list(self.flux.buffers())
                             if id(t) not in in_blocks)
        prefix = "ours_fp8" if options.fp8_matmul else "ours_bf16"
        for cap in MEMORY_CAPS_GIB:
            tag = f"{prefix}_cap{cap}gib"
            resident = resident_blocks(sizes, fixed, cap * 2**30, int(ACTIVATION_RESERVE_GIB * 2**30))
            self.report[tag + "_resident_blocks"] = resident
            with self.host_offloaded(self.flux), self.memory_cap(cap):
                self.row(tag, replace(options, offload_resident_blocks=resident))

    def profile_step(self, mode_tag: str, options, key: str) -> None:
        """Where one steady step spends its time: the top-15 device kernels by total time, and the time per kind
        (GEMM / attention / inductor-fused elementwise / other). The profiled step is the third of a 3-step run
        (compiled, fp8 calibration frozen). On the CPU (--tiny) the table lists operators by self CPU time, which
        only checks the code path."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with self.recorded(key):
            prepared = self.prepare_row(key, options)
            try:
                self.sample(prepared, 3)
                with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=1)) as prof:
                    def step_done(*_):
                        self.sync()
                        prof.step()

                    self.sample(prepared, 3, callback=step_done)
            finally:
                prepared.close()
            totals: dict[str, float] = {}
            for event in prof.events():
                if self.cuda and event.device_type != DeviceType.CUDA:
                    continue
                us = event.time_range.elapsed_us() if self.cuda else event.self_cpu_time_total
                totals[event.name] = totals.get(event.name, 0.0) + us
            total_us = sum(totals.values()) or 1.0
            kinds: dict[str, float] = {}
            for name, us in totals.items():
                kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
            top = sorted(totals.items(), key=lambda item: -item[1])[:15]
            self.report[key] = {
                "mode": mode_tag, "timer": "CUDA kernel time" if self.cuda else "CPU self time (tiny check only)",
                "total_ms": round(total_us / 1000, 2),
                "top_kernels": [{"name": name[:160], "kind": kernel_kind(name), "ms": round(us / 1000, 3),
                                 "share": round(us / total_us, 4)} for name, us in top],
                "by_kind": {kind: {"ms": round(us / 1000, 2), "share": round(us / total_us, 4)}
                            for kind, us in sorted(kinds.items(), key=lambda item: -item[1])}}
            self.emit()

    def fp8_variants_section(self) -> None:
        """Compiled rowwise fp8 without fast accumulation, then each chosen variant alone, then the variants that
        were faster, together. Calibrated rows spend the first step of every run calibrating (in ms/step, as in
        real use)."""
        from fluxworks.flux_speed.prepare import SpeedOptions

        started = time.perf_counter()
        baseline = SpeedOptions(compile=True, fp8_matmul=True, fp8_fast_accum=False)
        rows = {FP8_VARIANT_BASELINE: baseline}
        rows.update({f"ours_fp8v_{name}_compile": replace(baseline, **FP8_VARIANTS[name])
                     for name in self.args.fp8_variants})
        for tag, options in rows.items():
            self.row(tag, options)
        timed = {tag: self.report[tag + "_ms_per_step"] for tag in rows if tag + "_ms_per_step" in self.report}
        if FP8_VARIANT_BASELINE in timed:
            by_name = {name: timed[f"ours_fp8v_{name}_compile"] for name in self.args.fp8_variants
                       if f"ours_fp8v_{name}_compile" in timed}
            together = faster_variants_together(by_name, timed[FP8_VARIANT_BASELINE])
            self.report["fp8v_combo_options"] = together
            combo = replace(baseline, **together)
            if together and combo not in rows.values():  # not already timed alone
                rows["ours_fp8v_combo_compile"] = combo
                self.row("ours_fp8v_combo_compile", combo)
                if "ours_fp8v_combo_compile_ms_per_step" in self.report:
                    timed["ours_fp8v_combo_compile"] = self.report["ours_fp8v_combo_compile_ms_per_step"]
        if timed:
            best = min(timed, key=timed.get)
            self.report["fp8v_fastest"] = best
            if self.args.profile:
                self.profile_step(best, rows[best], "profile_fp8v_fastest_step")
        self.report["fp8v_section_s"] = round(time.perf_counter() - started, 1)
        self.emit()

    def offload_node(self) -> None:
        """The FluxWorks Speed node's defaults (compile, fp8 rowwise dynamic, fast accumulation) with
        offload_resident_blocks = --offload-resident, from a model the host left in CPU memory, under 8 GiB. With
        --tiny the resident count is clamped so at least one block is streamed."""
        from fluxworks.flux_speed.prepare import SpeedOptions, transformer_blocks

        resident = self.args.offload_resident
        if self.args.tiny:
            resident = min(resident, len(transformer_blocks(self.flux)) - 1)
        options = SpeedOptions(compile=True, fp8_matmul=True, offload_resident_blocks=resident)
        with self.host_offloaded(self.flux), self.memory_cap(8):
            self.row("ours_node_fp8_offload_cap8gib", options)

    def comfy_weights(self) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The state dict core loads and its prompt embeddings: the benchmark's own on a GPU; with --tiny a
        separate 1+1-block model, since core's FLUX detection fixes the width at 3072 (24 heads) and the text
        width at 4096, wider than the tiny model."""
        if not self.args.tiny:
            return {k: v.to("cpu") for k, v in self.flux.state_dict().items()}, self.embeds, self.pooled
        wide = self.new_flux(num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768)
        torch.manual_seed(1)
        embeds = torch.randn(1, self.embeds.shape[1], 4096, dtype=self.dtype)
        pooled = torch.randn(1, 768, dtype=self.dtype)
        return {k: v.to("cpu") for k, v in wide.state_dict().items()}, embeds, pooled

    def comfy_bf16(self) -> None:
        """Core's native bf16 model (comfy.sd.load_diffusion_model_state_dict) through comfy.sample.sample
        (euler, simple, cfg 1), same weights: a plain reference row; core's node-path modes are node_bench's."""
        import comfy.model_management
        import comfy.sample
        import comfy.sd

        tag = "comfy_bf16"
        self.report[tag + "_how"] = ("ComfyUI core native bf16: load_diffusion_model_state_dict + comfy.sample.sample "
                                     "(euler/simple, cfg 1); plain, not core's best mode (bench/node_bench.py)")
        with self.recorded(tag):
            state, embeds, pooled = self.comfy_weights()
            self.flux = None  # core loads its own copy
            self.free()
            latent = torch.zeros(1, 16, self.lat, self.lat)
            noise = comfy.sample.prepare_noise(latent, 42)
            positive = [[embeds.cpu(), {"pooled_output": pooled.cpu(), "guidance": 3.5}]]
            negative = [[torch.zeros_like(embeds.cpu()), {"pooled_output": torch.zeros_like(pooled.cpu())}]]

            def run(model, steps: int) -> None:
                comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                                    disable_pbar=True)

            start = time.perf_counter()
            model = comfy.sd.load_diffusion_model_state_dict(state)
            state.clear()
            run(model, 2)
            self.report[tag + "_warmup_s"] = round(time.perf_counter() - start, 1)
            self.reset_peak()
            self.sync()
            start = time.perf_counter()
            run(model, self.args.steps)
            self.sync()
            self.report[tag + "_ms_per_step"] = round((time.perf_counter() - start) / self.args.steps * 1000, 2)
            self.report[tag + "_peak_gib"] = self.peak()
            del model
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
            self.emit()

    def e2e_schnell(self) -> None:
        """One FLUX.1-schnell image as the nodes make it, with the FluxWorks Speed defaults: text encode, prepare
        (the Sampler prepares once per prompt), 4 denoise steps, VAE decode; each phase synchronised at its end.
        Median of 5 images after 2 warm-up images (1 and 1 with --tiny)."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from fluxworks.flux_models.text_encoders import Tokenizers, encode
        from fluxworks.flux_sampler import GuidanceCurve, TextConditioning
        from fluxworks.flux_speed.prepare import SpeedOptions, prepare

        tiny = self.args.tiny
        comfy_dir = os.path.join(self.args.comfy, "comfy")
        tok = Tokenizers.from_folders(os.path.join(comfy_dir, "sd1_tokenizer"),
                                      os.path.join(comfy_dir, "text_encoders", "t5_tokenizer"))
        t5_cfg = (dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64) if not tiny
                  else dict(d_model=self.text_width, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
        clip_cfg = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
                    if not tiny else dict(hidden_size=self.pooled_width, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=1))
        with torch.device(self.device):
            t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                         **t5_cfg)).to(self.dtype).eval()
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                                **clip_cfg)).to(self.dtype).eval()
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.3611,
                                shift_factor=0.1159, use_quant_conv=False,
                                use_post_quant_conv=False).to(self.dtype).eval()
        schnell = self.new_flux("schnell")
        options = SpeedOptions(compile=True, fp8_matmul=True)
        self.report["schnell_e2e_options"] = options_record(options)

        def generate():
            """One image; returns it and the seconds of each phase."""
            marks = [time.perf_counter()]
            enc = encode(t5, clip, tok, "a photo of a red fox in the snow", None, 256, self.device)
            positive = TextConditioning(enc.t5_embeds.to(self.dtype), enc.clip_pooled.to(self.dtype))
            self.sync()
            marks.append(time.perf_counter())
            prepared = prepare(schnell, options, self.device, self.dtype, interrupt=self.interrupt)
            try:
                self.sync()
                marks.append(time.perf_counter())
                _, latent = self.sample(prepared, 4, guidance_embeds=False, positive=positive,
                                        curve=GuidanceCurve.constant(0.0))
                marks.append(time.perf_counter())
            finally:
                prepared.close()
            image = vae.decode(latent.to(self.dtype), return_dict=False)[0]
            self.sync()
            marks.append(time.perf_counter())
            return image, [marks[i + 1] - marks[i] for i in range(len(marks) - 1)]

        def median(values):
            return round(sorted(values)[len(values) // 2], 3)

        warm, timed = (1, 1) if tiny else (2, 5)
        for _ in range(warm):
            generate()
        totals, phases = [], []
        for _ in range(timed):
            start = time.perf_counter()
            image, phase_s = generate()
            totals.append(time.perf_counter() - start)
            phases.append(phase_s)
        self.report["schnell_e2e_4steps_s"] = median(totals)
        for index, phase in enumerate(("text_encode", "prepare", "denoise_4steps", "vae_decode")):
            self.report[f"schnell_e2e_{phase}_s"] = median([p[index] for p in phases])
        self.report["schnell_e2e_denoise_ms_per_step"] = round(self.report["schnell_e2e_denoise_4steps_s"] / 4 * 1000,
                                                               1)
        self.report["schnell_e2e_image_shape"] = list(image.shape)
        self.emit()

    def summary(self) -> None:
        from fluxworks.flux_speed.prepare import SpeedOptions

        r = self.report
        ours = {k[: -len("_ms_per_step")]: v for k, v in r.items() if k.startswith("ours_") and k.endswith("_ms_per_step")}
        if ours:
            r["best_ours"] = min(ours, key=ours.get) + "_ms_per_step"
        default = options_record(SpeedOptions.defaults_for(self.device))
        r["no_speed_node_rows"] = [tag for tag in ours if r.get(tag + "_options") == default]
        if "comfy_bf16_ms_per_step" in r:
            base = r["comfy_bf16_ms_per_step"]
            r["speedup_vs_comfy_bf16"] = {tag: round(base / ms, 2) for tag, ms in ours.items()}
            for row in r.get("cache_rows", []):
                if "ms_per_step" in row:
                    row["speedup_vs_comfy_bf16"] = round(base / row["ms_per_step"], 2)
        r["bench_total_s"] = round(time.perf_counter() - self.started, 1)
        self.emit()

    def run(self) -> None:
        from fluxworks.flux_speed.compile import best_attention_backend
        from fluxworks.flux_speed.fp8_linear import fp8_matmul_supported
        from fluxworks.flux_speed.prepare import SpeedOptions

        sections, r = self.args.sections, self.report
        if self.cuda:
            self.matmul_tflops()
        self.flux = self.new_flux()
        r["params_B"] = round(sum(p.numel() for p in self.flux.parameters()) / 1e9, 3)
        r["attention_backend"] = best_attention_backend(self.device)
        diffusers_latent = self.diffusers_eager() if wants(sections, "diffusers") else None

        # the error reference: plain diffusers forward with native SDPA, through prepare like every row
        prepared = self.prepare_row(REFERENCE, SpeedOptions(attention="native"))
        try:
            self.reference = self.time_row(REFERENCE, prepared)
        finally:
            prepared.close()
        if diffusers_latent is not None:
            r["ours_eager_vs_diffusers_rel_err"] = rel(self.reference, diffusers_latent)
        self.row("ours_bf16_attn", SpeedOptions())
        base = ("ours_bf16_attn_compile", SpeedOptions(compile=True))
        if wants(sections, "compile"):
            self.row(*base)
        if wants(sections, "cache"):
            self.cache_probe()

        fp8_ok = fp8_matmul_supported(self.device) or self.args.tiny
        if fp8_ok and any(wants(sections, s) for s in ("fp8", "fp8_rowwise", "fp8_tensorwise")):
            base = self.fp8_section() or base
        r["derived_rows_mode"] = base[0]
        if self.args.profile:
            self.profile_step(*base, "profile_fp8_step")
        if wants(sections, "cache"):
            self.cache_rows(*base)
        if wants(sections, "batch"):
            self.batch_rows(*base)
        if wants(sections, "memory"):
            if self.cuda:
                self.memory_rows(base[1])
            else:
                r["memory_skipped"] = "memory caps need a CUDA GPU (torch.cuda.set_per_process_memory_fraction)"
        if fp8_ok and wants(sections, "fp8_variants"):
            self.fp8_variants_section()
        if wants(sections, "offload_node"):
            self.offload_node()
        if wants(sections, "comfy_bf16"):
            self.comfy_bf16()
        self.flux = None
        self.free()
        if wants(sections, "e2e"):
            with self.recorded("schnell_e2e"):
                self.e2e_schnell()
        self.summary()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start_comfy(args.comfy, "cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    try:
        args.cache_configs = parse_cache_configs(args.cache_configs)
    except ValueError as exc:
        raise SystemExit(f"speed_bench: {exc}") from exc
    os.makedirs(args.out, exist_ok=True)
    with torch.inference_mode():  # as ComfyUI runs every node
        SpeedBench(args).run()


if __name__ == "__main__":
    main()
