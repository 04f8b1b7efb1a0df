"""Our LoRA trainer against diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`, run as it is (a
subprocess), on the same tiny random FLUX.1-dev pipeline, the same pictures, settings and seed, on the CPU.

What is written (under --work, default .bench/training_vs_diffusers_script/):
- `pipeline/`: a tiny random FLUX.1-dev pipeline folder (`FluxPipeline.save_pretrained`: transformer, an
  AutoencoderKL with 16 latent channels, CLIP-L and T5 encoders, their tokenizers from the local ComfyUI tokenizer
  folders, FLUX.1-dev's scheduler config). The VAE's posterior variance is set to ~0 (log-variance bias -30) so the
  script's `latent_dist.sample()` and our cached `mode()` are the same latents, and its shift/scaling factors are
  the pictures' latent mean and 1/std, so the latents have unit variance as real FLUX.1 latents roughly do.
- `data/`: N pictures of the procedural shapes world (training/shapes.py), 128x128 PNG; every picture is trained
  with one --instance_prompt (the script's folder mode has no per-picture captions without the `datasets` package).
- `script/train_dreambooth_lora_flux.py`: the script at --diffusers-commit of a diffusers git directory.

The script runs as `python script.py ...` in a child process whose only addition is an accelerate tracker
(`--report_to fluxworks_jsonl`, registered with `accelerate.tracking.register_tracker_class`) that writes every
`accelerator.log({"loss", "lr"}, step)` call with a `time.perf_counter()` stamp: the script logs after every
optimiser step, so the stamps give its per-step time and its losses are read at full precision. Ours is
`flux_training.job.run_training` (what FluxWorks Train LoRA calls) on the dataset `encode_examples` builds from the
same pictures, encoded by the same VAE and by diffusers' `FluxPipeline.encode_prompt` (the script's encoding).

Matched settings: resolution, rank/alpha, lr (constant), steps, batch 1, AdamW (the script's defaults = ours:
weight decay 1e-4, betas 0.9/0.999, eps 1e-8, clip 1.0), seed, timesteps (the script's --weighting_scheme none =
our `uniform`, or logit_normal = `logit_normal`), guidance, LoRA layers (the script's default list = our
`attention_mlp`), T5 length, fp32. Same seed does not mean the same random numbers: the script draws noise and
timesteps from torch's global generator, we from our own, so per-step losses differ; the report compares shapes.

Per-step time: (stamp of the last step - stamp of the first) / (steps - 1), for each; model loading, encoding and
saving are outside it. Both run with the same torch thread count (--threads) on the same machine, one after the
other (--rounds alternates them).

Usage: OMP_NUM_THREADS=1 python -m bench.training_vs_diffusers_script --diffusers-git DIR/.git \\
           --json docs/bench/training_vs_diffusers_script_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from devtools.paths import REPO, tokenizer_folders
from devtools.tiny_models import TINY_FLUX, random_flux, random_text_encoders

SCRIPT_PATH = "examples/dreambooth/train_dreambooth_lora_flux.py"
TRACKER_NAME = "fluxworks_jsonl"
SCHEME = {"uniform": "none", "logit_normal": "logit_normal"}  # ours -> the script's --weighting_scheme
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


# ------------------------------------------------------------------------------------------------ the child


def run_reference(script: str, log_path: str, argv: list[str]) -> None:
    """In the child: register the JSON-lines tracker, then run the script as `python script argv...` would."""
    import runpy

    from accelerate.tracking import GeneralTracker, on_main_process, register_tracker_class

    class JsonLinesTracker(GeneralTracker):
        name = TRACKER_NAME
        requires_logging_directory = False

        def __init__(self, run_name: str, **kwargs) -> None:
            super().__init__()
            self.file = open(log_path, "w")  # noqa: SIM115 (closed in finish; flushed every line)

        @property
        def tracker(self):
            return self.file

        @on_main_process
        def store_init_configuration(self, values: dict) -> None:
            self.file.write(json.dumps({"config": {k: str(v) for k, v in values.items()}}) + "\n")
            self.file.flush()

        @on_main_process
        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            row = {"t": time.perf_counter(), "cpu": time.process_time(), "step": step, **{k: float(v) for k, v in values.items()}}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

        @on_main_process
        def finish(self) -> None:
            self.file.close()

    register_tracker_class(JsonLinesTracker)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


# ------------------------------------------------------------------------------------------------ inputs


def pictures(count: int, seed: int) -> list[np.ndarray]:
    from training.shapes import render_batch

    images, _ = render_batch(seed, 0, count)
    return list(images)


def tiny_vae(seed: int):
    """A FLUX.1-shaped AutoencoderKL (16 latent channels, 8x down) with ~zero posterior variance."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16, 32, 32, 32), use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=1.0, shift_factor=0.0)
    with torch.no_grad():
        conv = vae.encoder.conv_out  # 2 x 16 channels: mean, log-variance
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)  # std e^-15: sample() == mode() to 3e-7
    return vae.eval()


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1], as the script's ToTensor + Normalize([0.5], [0.5])."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def write_inputs(work: str, count: int, seed: int) -> dict:
    """The pipeline folder and the picture folder; returns their paths and the VAE calibration."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from PIL import Image
    from transformers import CLIPTokenizer, T5TokenizerFast

    data_dir, pipe_dir = os.path.join(work, "data"), os.path.join(work, "pipeline")
    os.makedirs(data_dir, exist_ok=True)
    images = pictures(count, seed)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(data_dir, f"{i:03d}.png"))
    vae = tiny_vae(seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_pixels(im)).latent_dist.mode() for im in images])
    shift, scale = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    t5, clip = random_text_encoders(seed)
    clip_dir, t5_dir = tokenizer_folders()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77), text_encoder_2=t5,
                        tokenizer_2=T5TokenizerFast.from_pretrained(t5_dir), transformer=random_flux("dev", seed))
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    return {"pipeline": pipe_dir, "data": data_dir, "vae_shift_factor": shift, "vae_scaling_factor": scale}


def script_at(git_dir: str, commit: str, work: str) -> dict:
    """Write the script at `commit` of a diffusers git directory into work/script/; its provenance."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True,
                              text=True).stdout

    full = git("rev-parse", commit).strip()
    last = git("log", "-1", "--format=%H %cs %s", full, "--", SCRIPT_PATH).strip()
    os.makedirs(os.path.join(work, "script"), exist_ok=True)
    path = os.path.join(work, "script", os.path.basename(SCRIPT_PATH))
    with open(path, "w") as f:
        f.write(git("show", f"{full}:{SCRIPT_PATH}"))
    return {"path": path, "diffusers_commit": full, "script_last_changed": last}


# ------------------------------------------------------------------------------------------------ the two runs


def per_step(stamps: list[float]) -> float:
    """Seconds per step from stamps taken after every optimiser step: the first step (warm-up) is left out."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def script_command(args, inputs: dict, script: str, out_dir: str, log_path: str) -> list[str]:
    flags = [
        "--pretrained_model_name_or_path", inputs["pipeline"], "--instance_data_dir", inputs["data"],
        "--instance_prompt", args.prompt, "--output_dir", out_dir, "--resolution", str(args.resolution),
        "--train_batch_size", "1", "--max_train_steps", str(args.steps), "--learning_rate", str(args.lr),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", str(args.rank),
        "--lora_alpha", str(args.rank), "--seed", str(args.seed), "--weighting_scheme", SCHEME[args.timesteps],
        "--guidance_scale", str(args.guidance), "--max_sequence_length", str(args.t5_length),
        "--mixed_precision", "no", "--cache_latents", "--checkpointing_steps", str(10 * args.steps),
        "--report_to", TRACKER_NAME, "--dataloader_num_workers", "0",
    ]
    return [sys.executable, "-m", "bench.training_vs_diffusers_script", "--reference-run", script, log_path,
            "--", *flags]


def run_theirs(args, inputs: dict, script: str, tag: str) -> dict:
    out_dir = os.path.join(args.work, f"script_out_{tag}")
    log_path = os.path.join(args.work, f"script_log_{tag}.jsonl")
    command = script_command(args, inputs, script, out_dir, log_path)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"the script failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "loss" in r]
    if len(steps) != args.steps:
        raise RuntimeError(f"the script logged {len(steps)} steps, expected {args.steps}")
    stamps, cpu = [r["t"] for r in steps], [r["cpu"] for r in steps]
    lora = os.path.join(out_dir, "pytorch_lora_weights.safetensors")
    return {"losses": [r["loss"] for r in steps], "lr": sorted({r["lr"] for r in steps}),
            "s_per_step": per_step(stamps), "cpu_s_per_step": per_step(cpu), "process_wall_s": round(wall, 2),
            "lora_file_written": os.path.isfile(lora), "command": command[3:]}


def our_dataset(inputs: dict, prompt: str, t5_length: int):
    """The cached set FluxWorks LoRA Dataset builds (`encode_examples`), from the same pictures and encoders."""
    from diffusers import AutoencoderKL, FluxPipeline
    from PIL import Image

    from fluxworks.flux_training.data import encode_examples

    pipe = FluxPipeline.from_pretrained(inputs["pipeline"], transformer=None)
    vae: AutoencoderKL = pipe.vae
    names = sorted(os.listdir(inputs["data"]))
    images = [np.asarray(Image.open(os.path.join(inputs["data"], n)).convert("RGB")) for n in names]

    def encode_pictures(pixels: torch.Tensor) -> torch.Tensor:  # (1, H, W, 3) uint8 -> model-space latent
        mean = vae.encode(to_pixels(pixels[0].numpy())).latent_dist.mode()
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text, pooled, _ = pipe.encode_prompt(texts, texts, device=torch.device("cpu"),
                                             max_sequence_length=t5_length)
        return text, pooled

    return encode_examples(images, [prompt] * len(images), encode_pictures, encode_texts)


def run_ours(args, inputs: dict, tag: str) -> dict:
    from diffusers import FluxTransformer2DModel

    from fluxworks.flux_training import TrainSettings
    from fluxworks.flux_training.job import run_training

    torch.set_num_threads(args.threads)
    dataset = our_dataset(inputs, args.prompt, args.t5_length)
    transformer = FluxTransformer2DModel.from_pretrained(inputs["pipeline"], subfolder="transformer")
    transformer.requires_grad_(False)
    settings = TrainSettings(steps=args.steps, rank=args.rank, alpha=float(args.rank), learning_rate=args.lr,
                             lr_schedule="constant", batch_size=1, timestep_sampling=args.timesteps,
                             guidance=args.guidance, lora_layers="attention_mlp", seed=args.seed)
    stamps: list[float] = []
    cpu: list[float] = []
    lrs: set[float] = set()

    def progress(report) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        lrs.add(report.lr)

    torch.manual_seed(args.seed)  # the LoRA's gaussian init draws from torch's generator, as the script's does
    path = os.path.join(args.work, f"ours_{tag}.safetensors")
    result = run_training(transformer, dataset, settings, torch.device("cpu"), path, torch.float32,
                          progress=progress)
    return {"losses": result.losses, "lr": sorted(lrs), "s_per_step": per_step(stamps), "cpu_s_per_step": per_step(cpu),
            "lora_file_written": os.path.isfile(path), "settings": {k: v for k, v in vars(settings).items()}}


# ------------------------------------------------------------------------------------------------ comparison


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (the usual loss smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def pearson(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


def shape(losses: list[float], beta: float) -> dict:
    n = len(losses)
    k = max(1, n // 5)
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    return {"mean_first_20pct": first, "mean_last_20pct": last, "ratio_last_to_first": last / first,
            "final_loss": losses[-1], f"final_ema_{beta}": ema(losses, beta)[-1],
            "mean": statistics.fmean(losses), "stdev": statistics.stdev(losses)}


def window_means(losses: list[float], windows: int) -> list[float]:
    size = len(losses) // windows
    return [statistics.fmean(losses[i * size:(i + 1) * size]) for i in range(windows)]


def compare(theirs: list[float], ours: list[float], beta: float) -> dict:
    w = 10
    return {
        "theirs": shape(theirs, beta), "ours": shape(ours, beta),
        f"pearson_ema_{beta}": pearson(ema(theirs, beta), ema(ours, beta)),
        f"pearson_window_means_{w}": pearson(window_means(theirs, w), window_means(ours, w)),
        f"window_means_{w}": {"theirs": window_means(theirs, w), "ours": window_means(ours, w)},
        "ratio_of_ratios_ours_over_theirs": shape(ours, beta)["ratio_last_to_first"]
        / shape(theirs, beta)["ratio_last_to_first"],
    }


def machine(threads: int, load_at_start: list[float]) -> dict:
    return {"load_average_at_start": load_at_start, "cpu_count": os.cpu_count(), "torch_threads": threads, "processor": platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_end": list(os.getloadavg())}


def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"diffusers": diffusers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-run":
        script, log_path = sys.argv[2], sys.argv[3]
        run_reference(script, log_path, sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-git", required=True, help="a diffusers git directory (e.g. a bare mirror)")
    parser.add_argument("--diffusers-commit", default="HEAD")
    parser.add_argument("--work", default=os.path.join(REPO, ".bench", "training_vs_diffusers_script"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--prompt", default="a picture of ciel shapes")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16, help="alpha = rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timesteps", choices=sorted(SCHEME), default="uniform")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--t5-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="theirs, ours, repeated (per-step time: median)")
    parser.add_argument("--ema", type=float, default=0.9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.resolution != 128:
        raise SystemExit("the shapes renderer draws 128x128 pictures: --resolution 128")
    os.makedirs(args.work, exist_ok=True)
    load_at_start = list(os.getloadavg())
    torch.set_num_threads(args.threads)

    inputs = write_inputs(args.work, args.images, args.seed)
    script = script_at(args.diffusers_git, args.diffusers_commit, args.work)
    runs: dict[str, list[dict]] = {"theirs": [], "ours": []}
    for r in range(args.rounds):
        runs["theirs"].append(run_theirs(args, inputs, script["path"], str(r)))
        last = runs['theirs'][-1]
        print(f"round {r}: script {last['s_per_step'] * 1e3:.1f} ms/step, cpu {last['cpu_s_per_step'] * 1e3:.1f}",  # noqa: T201
              flush=True)
        runs["ours"].append(run_ours(args, inputs, str(r)))
        last = runs['ours'][-1]
        print(f"round {r}: ours {last['s_per_step'] * 1e3:.1f} ms/step, cpu {last['cpu_s_per_step'] * 1e3:.1f}",  # noqa: T201
              flush=True)
    theirs, ours = runs["theirs"][0], runs["ours"][0]
    same_seed_repeatable = all(run["losses"] == theirs["losses"] for run in runs["theirs"]) and all(
        run["losses"] == ours["losses"] for run in runs["ours"])
    t_theirs = statistics.median(run["s_per_step"] for run in runs["theirs"])
    t_ours = statistics.median(run["s_per_step"] for run in runs["ours"])
    c_theirs = statistics.median(run["cpu_s_per_step"] for run in runs["theirs"])
    c_ours = statistics.median(run["cpu_s_per_step"] for run in runs["ours"])
    report = {
        "what": "our LoRA trainer (flux_training.job.run_training, the Train LoRA node's call) vs diffusers' "
                "train_dreambooth_lora_flux.py run as a subprocess; same tiny pipeline, pictures, settings, seed",
        "reference": {k: v for k, v in script.items() if k != "path"} | {"script": SCRIPT_PATH},
        "versions": versions(),
        "machine": machine(args.threads, load_at_start),
        "model": {"transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_FLUX.items()},
                  "vae": "AutoencoderKL 16 latent channels, block_out_channels (16, 32, 32, 32), posterior std ~0",
                  "vae_shift_factor": inputs["vae_shift_factor"], "vae_scaling_factor": inputs["vae_scaling_factor"],
                  "text_encoders": "tiny random CLIP-L (width 64) and T5 (d_model 64), real tokenizers"},
        "settings": {"images": args.images, "instance_prompt": args.prompt, "resolution": args.resolution,
                     "steps": args.steps, "batch": 1, "rank": args.rank, "alpha": args.rank, "lr": args.lr,
                     "lr_schedule": "constant", "optimizer": "AdamW wd 1e-4, clip 1.0", "seed": args.seed,
                     "timesteps": {"ours": args.timesteps, "script_weighting_scheme": SCHEME[args.timesteps]},
                     "guidance": args.guidance, "lora_layers": "attention_mlp (the script's default list)",
                     "t5_length": args.t5_length, "dtype": "float32", "threads": args.threads,
                     "rounds": args.rounds},
        "commands": {
            "bench": "OMP_NUM_THREADS=1 python -m bench.training_vs_diffusers_script " + shlex.join(sys.argv[1:]),
            "script": "python train_dreambooth_lora_flux.py " + shlex.join(theirs["command"][4:]),
            "ours": "flux_training.job.run_training(transformer, encode_examples(...), TrainSettings(...), cpu, "
                    "path, float32, progress=...)",
        },
        "shape_measures": "ratio of the mean loss over the last 20 % of steps to the first 20 %; Pearson correlation "
                          f"of the EMA-smoothed curves (beta {args.ema}, bias-corrected) and of the means of 10 "
                          "windows; the final loss (raw and EMA)",
        "comparison": compare(theirs["losses"], ours["losses"], args.ema),
        "time": {"theirs_s_per_step": t_theirs, "ours_s_per_step": t_ours, "ours_over_theirs": t_ours / t_theirs,
                 "theirs_cpu_s_per_step": c_theirs, "ours_cpu_s_per_step": c_ours,
                 "ours_over_theirs_cpu": c_ours / c_theirs,
                 "per_round": [{"theirs": a["s_per_step"], "ours": b["s_per_step"], "theirs_cpu": a["cpu_s_per_step"],
                                "ours_cpu": b["cpu_s_per_step"]}
                               for a, b in zip(runs["theirs"], runs["ours"], strict=True)],
                 "measure": "(stamp after the last optimiser step - stamp after the first) / (steps - 1), median "
                            "over rounds; wall clock (perf_counter) and the process's CPU time (process_time, "
                            "less sensitive to other load on a shared machine); setup, encoding and saving excluded",
                 "script_process_wall_s": [run["process_wall_s"] for run in runs["theirs"]]},
        "repeatable": same_seed_repeatable if args.rounds > 1 else None,
        "lora_files_written": {"theirs": theirs["lora_file_written"], "ours": ours["lora_file_written"]},
        "curves": {"theirs": theirs["losses"], "ours": ours["losses"]},
        "lr_seen": {"theirs": theirs["lr"], "ours": ours["lr"]},
    }
    assert all(math.isfinite(v) for v in theirs["losses"] + ours["losses"])
    summary = {k: report[k] for k in ("comparison", "time")}
    summary["comparison"] = {k: v for k, v in summary["comparison"].items() if not k.startswith("window_means")}
    print(json.dumps(summary, indent=1))  # noqa: T201
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
