"""FluxWorks speed benchmark: our sampler path in each speed mode next to diffusers eager and ComfyUI native,
in one run on one card, on the full FLUX.1 architecture with random weights initialised on the GPU.

Usage (repo root): python bench/speed_bench.py [--tiny] [--steps 28] [--res 1024] [--comfy .comfy] [--out DIR]
    [--sections all|diffusers,compile,cache,fp8,fp8_rowwise,fp8_tensorwise,fp8_variants,comfy,comfy_bf16,batch,offload_node,
                memory,e2e]
    [--cache-configs "0.6:0.1:0.9:3,..."] [--profile]
--tiny runs a 1+1-block model on the CPU to check the script. Prints one JSON line per finished section.
Our bf16 eager run (the error reference) always runs. `fp8` runs both fp8 scalings (rowwise, tensorwise);
the step-cache rows and --profile use the faster of the two. `comfy` runs all ComfyUI modes, `comfy_bf16`
only its bf16 baseline. `fp8_variants` (not in `all`: minutes of compiling) times compiled rowwise fp8 alone
and with each --fp8-variants option (fast accumulation, calibrated static activation scales, the same with
tensorwise weights, Inductor kernel tuning), then the options that were faster, together (keys ours_fp8v_*,
each with _options; with --profile the fastest is profiled too, key profile_fp8v_fastest_step). `e2e` splits the schnell image time into text encode, denoise and VAE decode.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time

import torch

from bench.report import sync as device_sync
from bench.report import write_report
from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, calculate_mu, get_sigmas, sample_flux
from fluxworks.flux_sampler.latents import make_noise, to_vae_space, unpack
from fluxworks.flux_speed.compile import best_attention_backend, compile_blocks, set_attention_backend
from fluxworks.flux_speed.fp8_linear import fp8_matmul_supported, quantize_transformer_linears
from fluxworks.flux_speed.offload import BlockOffloader
from fluxworks.flux_speed.prepare import SpeedOptions, make_runner, prepare_runner
from fluxworks.flux_speed.runner import FluxRunner
from fluxworks.flux_speed.step_cache import StepCacheConfig

ap = argparse.ArgumentParser()
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--steps", type=int, default=28)
ap.add_argument("--res", type=int, default=1024)
ap.add_argument("--comfy", default=".comfy")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--skip-comfy-compile", action="store_true")
ap.add_argument("--sections", default="all")
ap.add_argument("--cache-configs", default="0.1:0.1:0.9:3,0.3:0.1:0.9:3,0.6:0.1:0.9:3",
                help="step-cache rows on the fastest fp8 mode, threshold:start:end:max_consecutive, comma-separated "
                     "('' for none)")
ap.add_argument("--fp8-variants", default="fast_accum,calibrated,calibrated_tensorwise,tuned",  # FP8_VARIANT_NAMES
                help="fp8_variants section: which options to time alone next to the rowwise baseline, comma-separated")
ap.add_argument("--offload-resident", type=int, default=12,
                help="offload_node section: blocks kept on the GPU (the FluxWorks Speed offload_resident_blocks)")
ap.add_argument("--profile", action="store_true",
                help="profile one compiled fp8 step with torch.profiler; the top-15 kernels go into the JSON")
args = ap.parse_args()
BENCH_START = time.perf_counter()
DEV = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
R: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
           "steps": args.steps, "res": args.res, "date": time.strftime("%Y-%m-%d")}
SECTIONS = set(args.sections.split(","))


def parse_cache_configs(text: str) -> list[StepCacheConfig]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        if len(fields) != 4:
            ap.error(f"--cache-configs wants threshold:start:end:max_consecutive, got {item!r}")
        try:
            configs.append(StepCacheConfig(float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])))
        except ValueError as e:
            ap.error(f"--cache-configs {item!r}: {e}")
    return configs


CACHE_CONFIGS = parse_cache_configs(args.cache_configs)
FP8_VARIANT_NAMES = ("fast_accum", "calibrated", "calibrated_tensorwise", "tuned")
CHOSEN_FP8_VARIANTS = set(filter(None, (name.strip() for name in args.fp8_variants.split(","))))
if CHOSEN_FP8_VARIANTS - set(FP8_VARIANT_NAMES):
    ap.error(f"--fp8-variants: unknown {sorted(CHOSEN_FP8_VARIANTS - set(FP8_VARIANT_NAMES))}, "
             f"choose from {FP8_VARIANT_NAMES}")


OPT_IN_SECTIONS = {"fp8_variants"}  # minutes of compiling (kernel tuning): not part of "all"


def want(name: str) -> bool:
    return name in SECTIONS or ("all" in SECTIONS and name not in OPT_IN_SECTIONS)


def emit() -> None:
    write_report(R, os.path.join(args.out, "flux_speed.json"))


def sync() -> None:
    device_sync(DEV)


def peak() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else 0.0


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


FLUX_CFG = dict(guidance_embeds=True)
TXT, POOL = 4096, 768
if args.tiny:
    FLUX_CFG.update(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 56, 56))
    TXT, POOL = 32, 16


def new_flux(variant: str = "dev"):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        return FluxTransformer2DModel(**{**FLUX_CFG, "guidance_embeds": variant == "dev"}).to(DT).eval()


torch.manual_seed(1)
EMBEDS = torch.randn(1, 512, TXT, device=DEV, dtype=DT)
POOLED = torch.randn(1, POOL, device=DEV, dtype=DT)
LAT = args.res // 8


def ours(model, steps: int, batch: int = 1, guidance_embeds: bool = True, curve=None):
    """Our sampler path (what FluxWorksSampler runs), returning (ms/step, final raw latent)."""
    shape = (batch, 16, LAT, LAT)
    mu = calculate_mu((LAT // 2) ** 2) if guidance_embeds else None
    sigmas = get_sigmas(steps, mu).to(DEV)
    if isinstance(model, FluxRunner):
        model.begin(sigmas)
    noise = make_noise(shape, 42).to(DEV)
    sync()
    t = time.perf_counter()
    x, _ = sample_flux(model, guidance_embeds, TextConditioning(EMBEDS, POOLED), None, torch.zeros(shape, device=DEV),
                       noise, sigmas, curve or GuidanceCurve.constant(3.5), DT)
    sync()
    return round((time.perf_counter() - t) / steps * 1000, 2), to_vae_space(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.double() - b.double()).norm() / b.double().norm()), 5)


def timed(tag: str, model, reference=None, warm_steps: int = 2, **kw):
    try:
        return _timed(tag, model, reference, warm_steps, **kw)
    except Exception as e:  # noqa: BLE001 - a failed mode is recorded and the run goes on
        R[tag + "_error"] = repr(e)[:400]
        emit()
        return None


def _timed(tag: str, model, reference=None, warm_steps: int = 2, **kw):
    t = time.perf_counter()
    ours(model, warm_steps, **kw)
    R[tag + "_warmup_s"] = round(time.perf_counter() - t, 1)
    reset_peak()
    ms, lat = ours(model, args.steps, **kw)
    R[tag + "_ms_per_step"] = ms
    R[tag + "_peak_gib"] = peak()
    if reference is not None:
        R[tag + "_rel_err_vs_bf16"] = rel(lat, reference)
    emit()
    return lat


if DEV == "cuda":
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    R["bf16_matmul_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1)
    del a, b

# --- diffusers eager and our eager path (same weights) -------------------------------------------------
flux = new_flux()
R["params_B"] = round(sum(p.numel() for p in flux.parameters()) / 1e9, 3)
if want("diffusers"):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=flux)
    pipe.set_progress_bar_config(disable=True)

    from fluxworks.flux_sampler.latents import pack

    start = pack(make_noise((1, 16, LAT, LAT), 42)).to(DEV, DT)  # the same noise our path starts from

    def run_pipe(steps):
        return pipe(prompt_embeds=EMBEDS, pooled_prompt_embeds=POOLED, height=args.res, width=args.res,
                    num_inference_steps=steps, guidance_scale=3.5, output_type="latent", latents=start).images

    run_pipe(2)
    reset_peak()
    sync()
    t = time.perf_counter()
    d_lat = run_pipe(args.steps)
    sync()
    R["diffusers_eager_ms_per_step"] = round((time.perf_counter() - t) / args.steps * 1000, 2)
    R["diffusers_eager_peak_gib"] = peak()
    d_lat = to_vae_space(unpack(d_lat.float(), LAT, LAT))
    del pipe
    emit()

REF = timed("ours_eager_bf16", FluxRunner(flux))
if want("diffusers"):
    R["ours_eager_vs_diffusers_rel_err"] = rel(REF, d_lat)
backend = best_attention_backend(torch.device(DEV))
R["attention_backend"] = backend
set_attention_backend(flux, backend)
timed("ours_bf16_attn", FluxRunner(flux), REF)

def comfy_section(bf16_only: bool) -> None:
    """ComfyUI native (carried 0.3.75 source), same architecture and size, in this same process."""
    base = new_flux()
    sd = {k: v.to("cpu") for k, v in base.state_dict().items()}
    del base
    free()
    sys.argv = [sys.argv[0]] + ([] if DEV == "cuda" else ["--cpu"])
    sys.path.insert(0, os.path.abspath(args.comfy))
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    def run_comfy(model, steps):
        lat = torch.zeros(1, 16, LAT, LAT)
        noise = comfy.sample.prepare_noise(lat, 42)
        pos = [[EMBEDS.cpu(), {"pooled_output": POOLED.cpu(), "guidance": 3.5}]]
        neg = [[torch.zeros_like(EMBEDS.cpu()), {"pooled_output": torch.zeros_like(POOLED.cpu())}]]
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", pos, neg, lat, disable_pbar=True)

    configs = [("comfy_bf16", {}, False),
               ("comfy_fp8_fast", {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}, False)]
    if bf16_only:
        configs = configs[:1]
    elif not args.skip_comfy_compile:
        configs.append(("comfy_fp8_fast_compiled", {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}, True))
    for tag, opts, compiled in configs:
        try:
            t = time.perf_counter()
            m = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts)
            if compiled:
                m = m.clone()
                m.add_object_patch("diffusion_model", torch.compile(m.get_model_object("diffusion_model")))
            run_comfy(m, 2)
            R[tag + "_warmup_s"] = round(time.perf_counter() - t, 1)
            reset_peak()
            sync()
            t = time.perf_counter()
            run_comfy(m, args.steps)
            sync()
            R[tag + "_ms_per_step"] = round((time.perf_counter() - t) / args.steps * 1000, 2)
            R[tag + "_peak_gib"] = peak()
            del m
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
        except Exception as e:  # noqa: BLE001 - a failed baseline is recorded, the run goes on
            R[tag + "_error"] = repr(e)[:300]
        emit()



# --- regional compile ---------------------------------------------------------------------------------
if want("compile"):
    compile_blocks(flux)
    timed("ours_bf16_attn_compile", FluxRunner(flux), REF)
    if want("cache"):
        runner = FluxRunner(flux, StepCacheConfig(threshold=0.0))
        ours(runner, args.steps)
        changes = sorted(runner.cache_state.changes)
        R["first_block_change_per_step"] = {"min": round(changes[0], 4), "median": round(changes[len(changes) // 2], 4),
                                            "max": round(changes[-1], 4)} if changes else {}
        runner = None
        emit()

# --- fp8 matmul -----------------------------------------------------------------------------------------
FP8_MODES = {"rowwise": "ours_fp8_attn_compile", "tensorwise": "ours_fp8_tensorwise_attn_compile"}
KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
                ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "cublas", "scaled_mm")),
                ("inductor fused (norm, modulation, fp8 quantise, rope)", ("triton",)))


def fp8_model(scaling: str, source):
    """A fresh fp8 copy of the transformer (on the GPU from new weights, to keep one bf16 copy at a time)."""
    if args.tiny:
        model = copy.deepcopy(source)
    else:
        model = new_flux()
        set_attention_backend(model, backend)
    prefix = "fp8" if scaling == "rowwise" else "fp8_tensorwise"
    t = time.perf_counter()
    R[prefix + "_linears"] = quantize_transformer_linears(model, DT, scaling=scaling,
                                                          fast_accum=SpeedOptions().fp8_fast_accum)
    R[prefix + "_quantize_s"] = round(time.perf_counter() - t, 1)
    free()
    return model


def cache_rows(model, mode_tag: str) -> None:
    """One row per --cache-configs entry on `model`: ms/step, steps reused, final-latent error."""
    R.setdefault("cache_rows", [])
    for cfg in CACHE_CONFIGS:
        tag = (f"{mode_tag}_cache{cfg.threshold:g}_{cfg.start_percent:g}-{cfg.end_percent:g}"
               f"_max{cfg.max_consecutive}")
        runner = FluxRunner(model, cfg)
        timed(tag, runner, REF, warm_steps=3)
        row = {"mode": mode_tag, "key": tag, "threshold": cfg.threshold, "start": cfg.start_percent,
               "end": cfg.end_percent, "max_consecutive": cfg.max_consecutive, "steps": args.steps,
               "steps_reused": runner.cache_state.hits if runner.cache_state else None}
        for field in ("ms_per_step", "rel_err_vs_bf16", "error"):
            if f"{tag}_{field}" in R:
                row[field] = R[f"{tag}_{field}"]
        R[tag + "_hits"] = row["steps_reused"]
        R["cache_rows"].append(row)
        emit()


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def profile_step(model, mode_tag: str, key: str = "profile_fp8_step") -> None:
    """Where one compiled fp8 step spends its time: the top-15 device kernels by total time, and the time per
    kind (GEMM / attention / inductor-fused elementwise / other). On the CPU (--tiny) the same table lists
    operators by self CPU time, which only checks the code path."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = DEV == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    ours(make_runner(model), 2)  # calibrated fp8 linears measure on step 1 and freeze; a plain runner keeps that
    ours(FluxRunner(model), 1)  # warm for the 1-step schedule
    with profile(activities=activities) as prof:
        ours(FluxRunner(model), 1)
    totals: dict[str, float] = {}
    for event in prof.events():
        if on_gpu and event.device_type != DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us() if on_gpu else event.self_cpu_time_total
        totals[event.name] = totals.get(event.name, 0.0) + us
    total_us = sum(totals.values()) or 1.0
    kinds: dict[str, float] = {}
    for name, us in totals.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    top = sorted(totals.items(), key=lambda item: -item[1])[:15]
    R[key] = {
        "mode": mode_tag, "timer": "CUDA kernel time" if on_gpu else "CPU self time (tiny check only)",
        "total_ms": round(total_us / 1000, 2),
        "top_kernels": [{"name": name[:160], "kind": kernel_kind(name), "ms": round(us / 1000, 3),
                         "share": round(us / total_us, 4)} for name, us in top],
        "by_kind": {kind: {"ms": round(us / 1000, 2), "share": round(us / total_us, 4)}
                    for kind, us in sorted(kinds.items(), key=lambda item: -item[1])}}
    emit()


def fp8_section():
    """Both fp8 scalings with compile (rowwise also eager, as before); returns the faster compiled model."""
    global flux
    scalings = [s for s in ("rowwise", "tensorwise") if want("fp8") or want("fp8_" + s)]
    source = flux if args.tiny else None
    if not args.tiny:
        flux = None
        free()
    models = {}
    for scaling in scalings:
        model = fp8_model(scaling, source)
        if scaling == "rowwise":
            timed("ours_fp8_attn", FluxRunner(model), REF)
        compile_blocks(model)
        if timed(FP8_MODES[scaling], FluxRunner(model), REF) is not None:
            models[scaling] = model
    if not models:
        return None, None
    fastest = min(models, key=lambda scaling: R[FP8_MODES[scaling] + "_ms_per_step"])
    R["fp8_fastest_mode"] = FP8_MODES[fastest]
    fast = models.pop(fastest)
    models.clear()
    free()
    emit()
    return fast, FP8_MODES[fastest]


fp8_ok = fp8_matmul_supported(torch.device(DEV)) or args.tiny
fast = None
if fp8_ok and (want("fp8") or want("fp8_rowwise") or want("fp8_tensorwise")):
    fast, fast_tag = fp8_section()
if fast is not None:
    if args.profile:
        try:
            profile_step(fast, fast_tag)
        except Exception as e:  # noqa: BLE001 - a failed profile is recorded and the run goes on
            R["profile_error"] = repr(e)[:400]
            emit()
    cache_rows(fast, fast_tag)
    if want("batch"):
        for batch in (1, 2, 4):
            ms, _ = ours(FluxRunner(fast), 2, batch=batch)
            ms, _ = ours(FluxRunner(fast), args.steps, batch=batch)
            R[f"ours_fp8_compile_batch{batch}_images_per_s"] = round(1000 / (ms * args.steps) * batch, 3)
            emit()
    if want("memory") and DEV == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        for cap in (16, 8):
            free()
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
            runner = FluxRunner(fast)
            if cap == 8:
                blocks = list(fast.transformer_blocks) + list(fast.single_transformer_blocks)
                sizes = [sum(t.numel() * t.element_size() for t in b.parameters()) for b in blocks]
                block_ids = {id(t) for b in blocks for t in b.parameters()}
                other = sum(t.numel() * t.element_size() for t in fast.parameters() if id(t) not in block_ids)
                budget = cap * 2**30 - other - 3.0 * 2**30 - 3 * max(sizes)  # activations + streamed blocks
                resident = 0
                while resident < len(sizes) and sum(sizes[: resident + 1]) <= budget:
                    resident += 1
                runner = FluxRunner(fast, offloader=BlockOffloader(blocks, torch.device(DEV), resident=resident))
                R["offload_resident_blocks"] = resident
            try:
                timed(f"ours_fp8_cap{cap}gib", runner, REF)
            except torch.OutOfMemoryError as e:
                R[f"ours_fp8_cap{cap}gib_error"] = str(e)[:200]
                emit()
            torch.cuda.set_per_process_memory_fraction(1.0)
        fast.to(DEV)
    fast = runner = None
free()

# --- fp8 variants: each option alone on compiled rowwise fp8, then the options that helped, together -----------
FP8_VARIANT_CHOICES = (("ours_fp8v_rowwise_compile", {}),
                       ("ours_fp8v_fast_accum_compile", {"fast_accum": True}),
                       ("ours_fp8v_calibrated_compile", {"activations": "calibrated"}),
                       # tensorwise weights: cuBLAS's fastest fp8 GEMM, bias in its epilogue; the global amax
                       # that made dynamic tensorwise slower is what calibration removes
                       ("ours_fp8v_calibrated_tensorwise_compile",
                        {"activations": "calibrated", "scaling": "tensorwise"}),
                       ("ours_fp8v_tuned_compile", {"tune_kernels": True}))
FP8_VARIANTS = FP8_VARIANT_CHOICES[:1] + tuple(
    (tag, options) for tag, options in FP8_VARIANT_CHOICES[1:] if tag[len("ours_fp8v_"):-len("_compile")]
    in CHOSEN_FP8_VARIANTS)


def fp8_variant(tag: str, source, fast_accum: bool = False, activations: str = "dynamic",
                tune_kernels: bool = False, scaling: str = "rowwise"):
    """A fresh fp8 model with these options, compiled and timed; returns it, or None if it failed.
    Calibrated models run through a CalibratingRunner, so every timed run spends its first step calibrating
    (included in ms/step, as in real use)."""
    model = copy.deepcopy(source) if args.tiny else new_flux()
    set_attention_backend(model, backend)
    quantize_transformer_linears(model, DT, scaling=scaling, fast_accum=fast_accum, activations=activations)
    free()
    R[tag + "_options"] = {"scaling": scaling, "fast_accum": fast_accum, "activations": activations,
                           "tune_kernels": tune_kernels}
    compile_blocks(model, tune_kernels=tune_kernels)
    return model if timed(tag, make_runner(model), REF) is not None else None


def fp8_variants_section() -> None:
    global flux
    started = time.perf_counter()
    source = flux if args.tiny else None
    if not args.tiny:
        flux = None
        free()
    best_tag, best_model = None, None

    def keep_if_fastest(tag: str, model) -> None:
        nonlocal best_tag, best_model
        if model is not None and (best_tag is None or R[tag + "_ms_per_step"] < R[best_tag + "_ms_per_step"]):
            best_tag, best_model = tag, model

    for tag, options in FP8_VARIANTS:
        keep_if_fastest(tag, fp8_variant(tag, source, **options))
        free()
    baseline = R.get(FP8_VARIANTS[0][0] + "_ms_per_step")
    faster = [(R[tag + "_ms_per_step"], options) for tag, options in FP8_VARIANTS[1:]
              if baseline is not None and R.get(tag + "_ms_per_step", float("inf")) < baseline]
    helped = {}
    for _, options in sorted(faster, key=lambda item: -item[0]):
        helped.update(options)  # slowest first: where two variants set one option, the faster one's value wins
    R["fp8v_combo_options"] = helped
    if helped and all(helped != options for _, options in FP8_VARIANTS):  # not already timed alone
        keep_if_fastest("ours_fp8v_combo_compile", fp8_variant("ours_fp8v_combo_compile", source, **helped))
        free()
    R["fp8v_fastest"] = best_tag
    if best_model is not None and args.profile:
        try:
            profile_step(best_model, best_tag, "profile_fp8v_fastest_step")
        except Exception as e:  # noqa: BLE001 - a failed profile is recorded and the run goes on
            R["profile_fp8v_error"] = repr(e)[:400]
    best_model = None
    free()
    R["fp8v_section_s"] = round(time.perf_counter() - started, 1)
    emit()


if fp8_ok and want("fp8_variants"):
    fp8_variants_section()
if (want("comfy") or want("comfy_bf16")) and os.path.isdir(args.comfy):
    flux = runner = None  # ComfyUI loads its own copy
    free()
    comfy_section(bf16_only=not want("comfy"))

# --- block offload as the FluxWorks Sampler runs it: weights start in CPU memory (where the host leaves them
# with offload on), prepare_runner quantises, compiles and builds the offloader, under an 8 GiB cap ---------
if want("offload_node"):
    flux = None  # the bf16 reference copy: this section must fit in the cap on its own
    free()
    model = new_flux().to("cpu")
    free()
    for name, child in model.named_children():
        if name not in ("transformer_blocks", "single_transformer_blocks"):
            child.to(DEV)  # what host.streamed_on_device puts on the device
    if DEV == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, 8 / total))
    node_options = SpeedOptions(compile=True, fp8_matmul=fp8_ok, offload_resident_blocks=args.offload_resident)
    t = time.perf_counter()
    runner = prepare_runner(model, node_options, torch.device(DEV), DT)
    R["ours_node_offload_prepare_s"] = round(time.perf_counter() - t, 1)
    R["ours_node_offload_options"] = {"fp8_matmul": node_options.fp8_matmul,
                                      "offload_resident_blocks": node_options.offload_resident_blocks}
    timed("ours_node_fp8_offload_cap8gib", runner, REF)
    runner.offloader.close()
    if DEV == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
    model = runner = None
    free()

# --- schnell end to end: text encode + 4 steps + VAE decode ------------------------------------------------
if want("e2e"):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxworks.flux_models.text_encoders import Tokenizers, encode

    comfy_dir = os.path.join(args.comfy, "comfy")
    tok = Tokenizers.from_folders(os.path.join(comfy_dir, "sd1_tokenizer"),
                                  os.path.join(comfy_dir, "text_encoders", "t5_tokenizer"))
    t5_cfg = (dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64) if not args.tiny
              else dict(d_model=TXT, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    clip_cfg = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
                if not args.tiny else dict(hidden_size=POOL, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=1))
    with torch.device(DEV):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                     **t5_cfg)).to(DT).eval()
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                            **clip_cfg)).to(DT).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).to(DT).eval()
    schnell = new_flux("schnell")
    set_attention_backend(schnell, backend)
    if fp8_ok:
        quantize_transformer_linears(schnell, DT)
    compile_blocks(schnell)
    runner = FluxRunner(schnell)

    @torch.no_grad()
    def generate():
        """One image; returns it and the seconds of each phase (synchronised at the phase borders)."""
        marks = [time.perf_counter()]
        enc = encode(t5, clip, tok, "a photo of a red fox in the snow", None, 256, torch.device(DEV))
        sync()
        marks.append(time.perf_counter())
        shape = (1, 16, LAT, LAT)
        sigmas = get_sigmas(4, None).to(DEV)
        runner.begin(sigmas)
        x, _ = sample_flux(runner, False, TextConditioning(enc.t5_embeds.to(DT), enc.clip_pooled.to(DT)), None,
                           torch.zeros(shape, device=DEV), make_noise(shape, 1).to(DEV), sigmas,
                           GuidanceCurve.constant(0.0), DT)
        sync()
        marks.append(time.perf_counter())
        image = vae.decode(to_vae_space(x).to(DT), return_dict=False)[0]
        sync()
        marks.append(time.perf_counter())
        return image, [marks[i + 1] - marks[i] for i in range(len(marks) - 1)]

    def median(values):
        return round(sorted(values)[len(values) // 2], 3)

    for _ in range(2):
        generate()
    times, phases = [], []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        image, phase_s = generate()
        sync()
        times.append(time.perf_counter() - t)
        phases.append(phase_s)
    R["schnell_e2e_4steps_s"] = median(times)
    for index, phase in enumerate(("text_encode", "denoise_4steps", "vae_decode")):
        R[f"schnell_e2e_{phase}_s"] = median([p[index] for p in phases])
    R["schnell_e2e_denoise_ms_per_step"] = round(R["schnell_e2e_denoise_4steps_s"] / 4 * 1000, 1)
    R["schnell_e2e_image_shape"] = list(image.shape)
    del t5, clip, vae, schnell, runner
    free()
    emit()

best = min((v, k) for k, v in R.items() if k.startswith("ours_") and k.endswith("_ms_per_step"))
R["best_ours"] = best[1]
R["bench_total_s"] = round(time.perf_counter() - BENCH_START, 1)
if "comfy_bf16_ms_per_step" in R:
    R["speedup_vs_comfy_bf16"] = {k[: -len("_ms_per_step")]: round(R["comfy_bf16_ms_per_step"] / v, 2)
                                  for k, v in R.items() if k.startswith("ours_") and k.endswith("_ms_per_step")}
    for row in R.get("cache_rows", []):
        if "ms_per_step" in row:
            row["speedup_vs_comfy_bf16"] = round(R["comfy_bf16_ms_per_step"] / row["ms_per_step"], 2)
emit()
