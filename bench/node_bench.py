"""Node-path speed benchmark: FluxWorks and ComfyUI core, each timed through its own nodes, in one process on one
card, on the same random FLUX.1-dev weights, sigma table, noise and distilled guidance.

Why: a benchmark of hand-made paths times what the nodes might do; this one times what a user who adds the node
gets, and puts it next to core's best mode timed the way core's users get it (TorchCompileModel on a clone of the
UNETLoader `fp8_e4m3fn_fast` model, warmed on the timed sigma table; /work/shared/bench/README.md).

Rows (`--rows`, comma-separated; `all` = every row marked *):
  fluxworks_no_speed *          FluxWorksSampler on the loaded model (no Speed node): the error reference, always run
  fluxworks_speed *             + FluxWorksSpeed with the defaults of its INPUT_TYPES (what adding the node gives)
  fluxworks_speed_cache *       + FluxWorksStepCache with the defaults of its INPUT_TYPES
  fluxworks_extra *             one row per --extra entry
  core_bf16 *                   UNETLoader weight_dtype default (native bf16) + SamplerCustom
  core_fp8_fast *               UNETLoader weight_dtype fp8_e4m3fn_fast
  core_fp8_fast_easycache *     + EasyCache (node defaults)
  core_fp8_fast_lazycache *     + LazyCache (node defaults)
  core_fp8_fast_compile *       + TorchCompileModel (inductor): core's best mode, the ratio column's base
  core_fp8_fast_compile_easycache, core_fp8_fast_compile_lazycache   the cache nodes on core's compiled model
                                (opt-in: EasyCache's .item() breaks the compiled graph at every step, and the row
                                did not finish within a 10-minute command on the H200)
--extra takes a JSON list; each entry is {"speed": {FluxWorksSpeed kwargs} | null, "cache": {FluxWorksStepCache
kwargs}, "name": "..."} (all keys optional). The Speed node is applied with its defaults updated by "speed" (null:
no Speed node); the Step Cache node only when "cache" is given, with its defaults updated by it. Example:
  --extra '[{"speed": {"compile": false}}, {"cache": {"threshold": 0.3}}]'

Per row: one warm-up run at the timed step count (it loads the model and compiles), then --repeats timed runs
(ms/step = median run time / steps), peak GiB of the timed runs, the exact node settings, the final latent's
relative error against fluxworks_no_speed, and the steps a step cache reused (read from the sampler's log line).
The compiled cache rows reuse the TorchCompileModel output of core_fp8_fast_compile, as a workflow's cache node
downstream of one TorchCompileModel does.
--budget-s skips rows that would not finish in time, so one device command returns its report (default 480 s
on a GPU: the device tool stops a command at 600 s). Estimated H200 time at 1024^2 / 28 steps / 2 repeats for
every default row: about 6 min (imports and weights 45 s, each eager row 15-45 s, the FluxWorks compile row 30-40 s,
core's whole-model compile row 125 s; measured 2026-12-01). Row costs for the budget are these estimates.

Usage (repo root; ComfyUI and the package `fluxworks` come from PYTHONPATH, nothing edits sys.path):
  here:  PYTHONPATH=.comfyui .venv/bin/python bench/node_bench.py --tiny --comfy .comfyui
  GPU:   mkdir -p /tmp/pk && ln -sfn $PWD /tmp/pk/fluxworks && \\
         PYTHONPATH=/tmp/pk:/tmp/site:$PWD/.comfy python3 bench/node_bench.py --comfy .comfy
         [--steps 28] [--res 1024] [--seed 42] [--repeats 2] [--rows all] [--extra JSON] [--budget-s 480] [--out DIR]
--tiny runs a 1+1-block model of width 3072 (24 heads: core's Flux loader assumes that width) on the CPU at 64x64,
2 steps, skipping the rows that need a GPU, to check the script end to end. Prints a line per finished row, then
the whole report as one JSON line (DIR/node_bench.json, rewritten after every row) and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger("node_bench")

REFERENCE = "fluxworks_no_speed"
CORE_BEST = "core_fp8_fast_compile"
EXTRA = "fluxworks_extra"
# UNETLoader.load_unet's model_options for its weight_dtype choices (ComfyUI nodes.py, 0.3.75).
UNET_LOADER_OPTIONS = {"default": {}, "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}}


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row. `expected_s`: a rough H200 cost at 1024^2 / 28 steps, only for the time budget."""

    name: str
    label: str
    expected_s: float
    weight_dtype: str | None = None  # core rows: the UNETLoader choice
    compile: bool = False  # core rows: TorchCompileModel
    cache_node: str | None = None  # core rows: "EasyCache" / "LazyCache"
    speed: dict | None = None  # FluxWorks rows: FluxWorksSpeed kwargs over its defaults (None: no Speed node)
    cache: dict | None = None  # FluxWorks rows: FluxWorksStepCache kwargs over its defaults (None: no node)
    in_all: bool = True

    @property
    def side(self) -> str:
        return "core" if self.weight_dtype is not None else "fluxworks"


ROWS = (
    RowSpec(REFERENCE, "FluxWorks, no Speed node (reference)", 25),
    RowSpec("fluxworks_speed", "FluxWorks + Speed defaults", 40, speed={}),
    RowSpec("fluxworks_speed_cache", "FluxWorks + Speed defaults + Step Cache defaults", 20, speed={}, cache={}),
    RowSpec("core_bf16", "core native bf16", 30, weight_dtype="default"),
    RowSpec("core_fp8_fast", "core fp8_e4m3fn_fast", 25, weight_dtype="fp8_e4m3fn_fast"),
    RowSpec("core_fp8_fast_easycache", "core fp8_fast + EasyCache", 20, weight_dtype="fp8_e4m3fn_fast",
            cache_node="EasyCache"),
    RowSpec("core_fp8_fast_lazycache", "core fp8_fast + LazyCache", 20, weight_dtype="fp8_e4m3fn_fast",
            cache_node="LazyCache"),
    RowSpec(CORE_BEST, "core fp8_fast + TorchCompileModel (core best mode)", 125, weight_dtype="fp8_e4m3fn_fast",
            compile=True),
    # Opt-in: EasyCache's wrapper reads a tensor with .item() inside the compiled model, so the graph breaks every
    # step; on the H200 (2026-12-01) this row did not finish in the 250 s left of a 10-minute command.
    RowSpec("core_fp8_fast_compile_easycache", "core fp8_fast + TorchCompileModel + EasyCache", 300,
            weight_dtype="fp8_e4m3fn_fast", compile=True, cache_node="EasyCache", in_all=False),
    RowSpec("core_fp8_fast_compile_lazycache", "core fp8_fast + TorchCompileModel + LazyCache", 300,
            weight_dtype="fp8_e4m3fn_fast", compile=True, cache_node="LazyCache", in_all=False),
)
ROW_NAMES = tuple(spec.name for spec in ROWS) + (EXTRA,)

# The reuse counts the caches log once per run: FluxWorksSampler's step cache and core's EasyCache/LazyCache.
FLUXWORKS_REUSE = re.compile(r"step cache reused .*? on (\d+) of (\d+)")
CORE_SKIPPED = re.compile(r"(?:EasyCache|LazyCache) - skipped (\d+)/(\d+) steps")
# Nodes every row of a side shares (the table names them once); the others make the row's model.
SAMPLING_NODES = ("FluxWorksSampler", "FluxGuidance", "ConditioningZeroOut", "KSamplerSelect", "SamplerCustom")


# --- pure helpers (no ComfyUI needed) -----------------------------------------------------------------------------

def widget_inputs(input_types: dict) -> dict[str, tuple]:
    """A V1 node's widget inputs (required, then optional) by name; sockets such as FLUX_MODEL are left out."""
    inputs = {**input_types.get("required", {}), **input_types.get("optional", {})}
    return {name: entry for name, entry in inputs.items()
            if isinstance(entry[0], (list, tuple)) or entry[0] in ("BOOLEAN", "INT", "FLOAT", "STRING")}


def widget_defaults(node_name: str, input_types: dict) -> dict:
    """The widget values a freshly added node has: each input's `default`, a combo's first choice without one."""
    out = {}
    for name, entry in widget_inputs(input_types).items():
        kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
        if "default" in options:
            out[name] = options["default"]
        elif isinstance(kind, (list, tuple)) and kind:
            out[name] = kind[0]
        else:
            raise ValueError(f"{node_name}.{name} has no default; give it explicitly")
    return out


def check_widget_values(node_name: str, input_types: dict, values: dict) -> None:
    """Reject kwargs a node would not accept from a workflow: unknown names, wrong types, out-of-range numbers and
    choices not in a combo, each named with the fix."""
    if not isinstance(values, dict):
        raise ValueError(f"{node_name} settings must be a JSON object of widget values, got {values!r}")
    widgets = widget_inputs(input_types)
    for name, value in values.items():
        if name not in widgets:
            raise ValueError(f"{node_name} has no input {name!r}; its widgets are {sorted(widgets)}")
        kind, options = widgets[name][0], (widgets[name][1] if len(widgets[name]) > 1 else {})
        if isinstance(kind, (list, tuple)):
            if value not in kind:
                raise ValueError(f"{node_name}.{name} = {value!r} is not one of {list(kind)}")
            continue
        wanted = {"BOOLEAN": (bool,), "INT": (int,), "FLOAT": (int, float), "STRING": (str,)}[kind]
        if not isinstance(value, wanted) or (kind in ("INT", "FLOAT") and isinstance(value, bool)):
            raise ValueError(f"{node_name}.{name} is a {kind}, got {value!r}")
        if kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
            raise ValueError(f"{node_name}.{name} = {value!r} is outside [{options.get('min')}, {options.get('max')}]")


def parse_extra(text: str, speed_types: dict, cache_types: dict) -> list[RowSpec]:
    """--extra JSON -> FluxWorks rows, each checked against the Speed and Step Cache nodes' INPUT_TYPES."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra is not valid JSON ({exc}); expected a list like "
                         '[{"speed": {"compile": false}}, {"cache": {"threshold": 0.3}}]') from exc
    if not isinstance(entries, list):
        raise ValueError(f"--extra must be a JSON list of rows, got {type(entries).__name__}")
    rows, names = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"speed", "cache", "name"}:
            raise ValueError(f"--extra row {index} must be an object with keys 'speed', 'cache' and 'name' "
                             f"(all optional), got {entry!r}")
        speed = entry.get("speed", {})
        cache = entry.get("cache")
        if speed is not None:
            check_widget_values("FluxWorksSpeed", speed_types, speed)
        if cache is not None:
            check_widget_values("FluxWorksStepCache", cache_types, cache)
        name = f"{EXTRA}_{entry.get('name', index)}"
        if name in names or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"--extra row {index}: name {entry.get('name')!r} is repeated or not a plain word")
        names.add(name)
        parts = [("Speed " + (json.dumps(speed, sort_keys=True) if speed else "defaults")) if speed is not None
                 else "no Speed node"]
        if cache is not None:
            parts.append("Step Cache " + (json.dumps(cache, sort_keys=True) if cache else "defaults"))
        rows.append(RowSpec(name, "FluxWorks extra: " + ", ".join(parts), 40,
                            speed=speed, cache=cache))
    return rows


def select_rows(text: str, extra: list[RowSpec], on_gpu: bool) -> list[RowSpec]:
    """The rows to report, in order: the reference always, extras before core. The compiled core rows need a GPU,
    so on the CPU `all` also takes the uncompiled cache rows, to check the cache nodes' path."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(ROW_NAMES) - {"all"}
    if unknown:
        raise ValueError(f"--rows: unknown {sorted(unknown)}; choose from all, {', '.join(ROW_NAMES)}")
    wanted = [spec for spec in ROWS if spec.name in chosen or spec.name == REFERENCE
              or ("all" in chosen and (spec.in_all or (not on_gpu and spec.cache_node and not spec.compile)))]
    if "all" in chosen or EXTRA in chosen:
        first_core = next((i for i, spec in enumerate(wanted) if spec.side == "core"), len(wanted))
        wanted[first_core:first_core] = extra
    return wanted


def over_budget(elapsed: float, expected: float, budget: float | None) -> str | None:
    """Why a row is not started (it would end past the budget), or None when it fits or there is no budget."""
    if budget is None or elapsed + expected <= budget:
        return None
    return f"time budget: {elapsed:.0f} s used + ~{expected:.0f} s expected > {budget:.0f} s"


def rel_error(latent: torch.Tensor, reference: torch.Tensor) -> float:
    """||latent - reference|| / ||reference|| in float64."""
    diff = latent.double() - reference.double()
    return float(f"{float(diff.norm() / reference.double().norm()):.4g}")


def add_ratios(rows: list[dict]) -> str | None:
    """Speed-up columns: core's best mode's ms/step (or, where that row did not run, the fastest core row that
    skips no steps) and core native bf16's, each divided by the row's. Returns the base row's name."""
    timed = {row["mode"]: row["ms_per_step"] for row in rows if "ms_per_step" in row}
    best = CORE_BEST if CORE_BEST in timed else min(
        (row["mode"] for row in rows if row["mode"] in timed and row["side"] == "core"
         and not row["settings"].get("EasyCache") and not row["settings"].get("LazyCache")),
        key=timed.get, default=None)
    for row in rows:
        if row["mode"] in timed:
            ms = timed[row["mode"]]
            row["x_core_best"] = round(timed[best] / ms, 3) if best else None
            row["x_core_bf16"] = round(timed["core_bf16"] / ms, 3) if "core_bf16" in timed else None
    return best


def settings_text(settings: dict, leave_out: tuple[str, ...] = ()) -> str:
    """Node settings as `Node(k=v, ...)` joined by ' + ', in the order the nodes are chained."""
    parts = []
    for node, values in settings.items():
        if node in leave_out:
            continue
        if isinstance(values, dict):
            parts.append(f"{node}(" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")")
        else:
            parts.append(f"{node}({values})")
    return " + ".join(parts)


def markdown_table(rows: list[dict], best: str | None) -> str:
    """The report as a markdown table; the sampler nodes every row of a side shares are named once above it."""
    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        return "—" if value is None else format(value, spec)

    def reused(row: dict) -> str:
        if row.get("steps_reused") is None:
            return row.get("steps_reused_note", "—")
        return f"{row['steps_reused']} of {row['steps_reused_of']}"

    lines = []
    for side in ("fluxworks", "core"):
        shared = next((row["settings"] for row in rows if row["side"] == side), None)
        if shared is not None:
            common = {node: values for node, values in shared.items() if node in SAMPLING_NODES}
            lines.append(f"Every {side} row: {settings_text(common)}")
    lines += [f"x core best mode = ms/step of {best or '(no core row)'} / the row's ms/step (above 1: faster)", "",
              "| mode | node settings | ms/step | x core best mode | x core native bf16 | peak GiB | warm-up s "
              "| final-latent rel. error | steps reused |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        nodes = settings_text(row["settings"], SAMPLING_NODES) or "no Speed node"
        if "ms_per_step" not in row:
            why = row.get("skipped") or ("failed: " + row.get("error", "?")[:160])
            lines.append(f"| {row['label']} | {nodes} | {why} | | | | | | |")
            continue
        error = "0 (reference)" if row["mode"] == REFERENCE else cell(row, "rel_error", ".3g")
        lines.append(f"| {row['label']} | {nodes} | {row['ms_per_step']:.1f} | {cell(row, 'x_core_best', '.2f')} "
                     f"| {cell(row, 'x_core_bf16', '.2f')} | {cell(row, 'peak_gib', '.2f')} | {row['warmup_s']:.1f} "
                     f"| {error} | {reused(row)} |")
    return "\n".join(lines)


def parse_reuse(messages: list[str], pattern: re.Pattern) -> tuple[int, int] | None:
    """(reused, total) from the last matching log line of one run, None when there is none."""
    for message in reversed(messages):
        found = pattern.search(message)
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


class LogCapture(logging.Handler):
    """Keeps the log messages of the current run: the caches report their reuse counts only there."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- the run ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="1+1-block width-3072 model on the CPU, 64x64, 2 steps")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row after the warm-up (median)")
    ap.add_argument("--rows", default="all", help="comma-separated: all, " + ", ".join(ROW_NAMES))
    ap.add_argument("--extra", default="[]", help="JSON list of extra FluxWorks rows (see the module docstring)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip rows that would end after this many seconds (default 480 on a GPU, none on the CPU)")
    ap.add_argument("--comfy", default=".comfy", help="the ComfyUI folder that is on PYTHONPATH")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.tiny:
        args.res, args.steps = min(args.res, 64), min(args.steps, 2)
    if args.steps < 1 or args.repeats < 1 or args.res % 16:
        ap.error(f"--steps and --repeats must be at least 1 and --res a multiple of 16, got {args.steps}, "
                 f"{args.repeats}, {args.res}")
    return args


def start_comfy(folder: str, device: str) -> None:
    """ComfyUI as a library, set up as its launcher does: its argument parser reads sys.argv (--cpu for the CPU)
    when comfy.model_management is first imported, so this runs before anything imports the pack or core."""
    sys.argv = [sys.argv[0]] + (["--cpu"] if device == "cpu" else [])
    try:
        import comfy.options
    except ImportError as exc:
        raise SystemExit(f"ComfyUI is not importable: put its folder on PYTHONPATH (PYTHONPATH={folder})") from exc
    comfy.options.enable_args_parsing()
    import comfy.utils

    from fluxworks.bench.report import check_comfy

    check_comfy(folder)
    comfy.utils.set_progress_bar_enabled(False)  # core's tqdm bar: console noise, the same for every core row


def capture_logs() -> LogCapture:
    """Route INFO records (where the caches report reuse) to a LogCapture; keep a console handler for the rest."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(logging.INFO)
    capture = LogCapture()
    root.addHandler(capture)
    return capture


class NodeBench:
    """One run: the shared weights and inputs, the FluxWorks rows, then the core rows, then the report."""

    def __init__(self, args: argparse.Namespace, device: str, log: LogCapture, started: float) -> None:
        from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
        from comfy_extras.nodes_torch_compile import TorchCompileModel

        from fluxworks.bench.report import write_report
        from fluxworks.nodes.sampler import FluxWorksSampler
        from fluxworks.nodes.speed import FluxWorksSpeed, FluxWorksStepCache

        self.args, self.device, self.log, self.write_report = args, device, log, write_report
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.started = started  # the process's start: the device tool's limit counts the imports too
        self.budget = args.budget_s if args.budget_s is not None else (480.0 if device == "cuda" else None)
        self.report: dict = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "res": args.res, "steps": args.steps, "seed": args.seed, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d"), "budget_s": self.budget, "rows": []}
        self.latents: dict[str, torch.Tensor] = {}
        if args.tiny:
            self.flux_config = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                                    joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True)
            self.text_shape = (16, 32, 16)  # tokens, T5 width, pooled CLIP width
        else:
            self.flux_config = dict(guidance_embeds=True)  # diffusers' defaults are FLUX.1-dev's sizes
            self.text_shape = (512, 4096, 768)
        # Widget values as a freshly added node has them (the sampler's seed and steps from the command line).
        self.sampler_kwargs = {**widget_defaults("FluxWorksSampler", FluxWorksSampler.INPUT_TYPES()),
                               "seed": args.seed, "steps": args.steps}
        self.speed_defaults = widget_defaults("FluxWorksSpeed", FluxWorksSpeed.INPUT_TYPES())
        self.cache_defaults = widget_defaults("FluxWorksStepCache", FluxWorksStepCache.INPUT_TYPES())
        self.core_defaults = {"TorchCompileModel": v3_defaults(TorchCompileModel),
                              "EasyCache": v3_defaults(EasyCacheNode), "LazyCache": v3_defaults(LazyCacheNode)}
        self.core_sampling = {"add_noise": True, "noise_seed": args.seed, "cfg": 1.0}

    def settings(self, spec: RowSpec) -> dict:
        """The row's nodes in chain order with their exact widget values (what a workflow would hold)."""
        if spec.side == "fluxworks":
            out = {}
            if spec.speed is not None:
                out["FluxWorksSpeed"] = {**self.speed_defaults, **spec.speed}
            if spec.cache is not None:
                out["FluxWorksStepCache"] = {**self.cache_defaults, **spec.cache}
            out["FluxWorksSampler"] = self.sampler_kwargs
            return out
        out = {"UNETLoader": {"weight_dtype": spec.weight_dtype}}
        if spec.compile:
            out["TorchCompileModel"] = self.core_defaults["TorchCompileModel"]
        if spec.cache_node:
            out[spec.cache_node] = self.core_defaults[spec.cache_node]
        out["FluxGuidance"] = {"guidance": self.sampler_kwargs["guidance"]}
        out["ConditioningZeroOut"] = "negative, not evaluated at cfg 1"
        out["KSamplerSelect"] = {"sampler_name": "euler"}
        out["SamplerCustom"] = {**self.core_sampling, "sigmas": "FluxWorksSampler's table"}
        return out

    # helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def emit(self, final: bool = False) -> None:
        """Rewrite the report file after every row (a run cut off keeps its rows); print it only at the end."""
        self.write_report(self.report, os.path.join(self.args.out, "node_bench.json"), echo=final)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        import comfy.model_management as mm

        gc.collect()
        mm.soft_empty_cache()

    def start_row(self, spec: RowSpec) -> dict | None:
        """The row's report entry, or None when it is skipped (needs a GPU, or would end past the time budget)."""
        row = {"mode": spec.name, "label": spec.label, "side": spec.side, "settings": self.settings(spec)}
        self.report["rows"].append(row)
        if spec.compile and self.device != "cuda":
            row["skipped"] = "needs a GPU (TorchCompileModel)"
        elif over_budget(self.elapsed(), spec.expected_s, self.budget):
            row["skipped"] = over_budget(self.elapsed(), spec.expected_s, self.budget)
            logger.warning("node_bench: %s skipped (%s)", spec.name, row["skipped"])
        return None if "skipped" in row else row

    def measure(self, row: dict, run, reuse: re.Pattern | None) -> None:
        """One warm-up run at the timed step count (loads, compiles), then the timed runs; the peak is the timed
        runs' (allocator peak after a reset, with the previous rows' leftovers freed first)."""
        started = time.perf_counter()
        self.free()
        t = time.perf_counter()
        run()
        self.sync()
        row["warmup_s"] = round(time.perf_counter() - t, 1)
        self.free()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(self.args.repeats):
            self.log.messages.clear()
            self.sync()
            t = time.perf_counter()
            latent = run()
            self.sync()
            seconds.append(time.perf_counter() - t)
        row["runs_ms_per_step"] = [round(s / self.args.steps * 1000, 2) for s in seconds]
        row["ms_per_step"] = round(statistics.median(seconds) / self.args.steps * 1000, 2)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None
        if reuse is not None:
            counts = parse_reuse(self.log.messages, reuse)
            if counts is None:
                row["steps_reused"], row["steps_reused_note"] = None, "no reuse line in the log"
            else:
                row["steps_reused"], row["steps_reused_of"] = counts
        self.latents[row["mode"]] = latent.float().cpu()
        if REFERENCE in self.latents:
            row["rel_error"] = rel_error(self.latents[row["mode"]], self.latents[REFERENCE])
        row["row_s"] = round(time.perf_counter() - started, 1)
        print(f"[{self.elapsed():6.0f} s] {row['mode']}: {row['ms_per_step']:.1f} ms/step, warm-up "  # noqa: T201
              f"{row['warmup_s']:.1f} s, row {row['row_s']:.0f} s", flush=True)

    def guarded(self, row: dict, body) -> None:
        """Run one row; a failure is recorded in the row (with its traceback on the console) and the run goes on."""
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - a failed row is reported in the table, the other rows still run
            logger.exception("node_bench: row %s failed", row["mode"])
            row["error"] = repr(exc)[:600]
            self.free()
        self.emit()

    # inputs both sides share
    def random_state(self) -> dict[str, torch.Tensor]:
        """FLUX.1-dev-shaped diffusers weights drawn on the device (fast), kept in CPU memory as the one source
        both sides load from."""
        from diffusers import FluxTransformer2DModel

        t = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(self.device):
            model = FluxTransformer2DModel(**self.flux_config).to(self.dtype)
        state = {k: v.to("cpu") for k, v in model.state_dict().items()}
        del model
        self.free()
        self.report["params_B"] = round(sum(v.numel() for v in state.values()) / 1e9, 3)
        self.report["init_s"] = round(time.perf_counter() - t, 1)
        return state

    def conditioning_and_latent(self):
        """Random T5/CLIP-shaped CONDITIONING ([[tokens, {"pooled_output": ...}]]) and EmptySD3LatentImage's latent."""
        from comfy_extras.nodes_sd3 import EmptySD3LatentImage

        tokens, width, pooled = self.text_shape
        g = torch.Generator().manual_seed(1)
        positive = [[torch.randn(1, tokens, width, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]
        latent = EmptySD3LatentImage.execute(width=self.args.res, height=self.args.res, batch_size=1).result[0]
        return positive, latent

    # FluxWorks
    def fluxworks_side(self, state: dict, specs: list[RowSpec], positive, latent) -> torch.Tensor:
        """Every FluxWorks row through FluxWorksSampler on one loaded model (a FLUX_MODEL built as the loader node
        builds it); returns the sigma table the sampler used, for core."""
        from fluxworks.flux_models.holders import FluxModel
        from fluxworks.flux_models.transformer import build_transformer, infer_config
        from fluxworks.nodes import host
        from fluxworks.nodes.sampler import FluxWorksSampler
        from fluxworks.nodes.speed import FluxWorksSpeed, FluxWorksStepCache

        config = infer_config(state)
        transformer = build_transformer(dict(state), config, self.dtype)
        base = host.wrap_patcher(FluxModel(transformer, config, self.dtype, "random FLUX.1-dev weights"),
                                 *host.model_devices())
        sampler = FluxWorksSampler()
        for spec in specs:
            row = self.start_row(spec)
            if row is None:
                continue

            def body(spec=spec, row=row):
                model = base
                if spec.speed is not None:
                    (model,) = FluxWorksSpeed().apply(model, **row["settings"]["FluxWorksSpeed"])
                if spec.cache is not None:
                    (model,) = FluxWorksStepCache().apply(model, **row["settings"]["FluxWorksStepCache"])
                self.measure(row, lambda: sampler.sample(model, positive, latent, **self.sampler_kwargs)[0]["samples"],
                             FLUXWORKS_REUSE if spec.cache is not None else None)

            self.guarded(row, body)
        return sampler_sigmas(config, latent["samples"], self.sampler_kwargs)

    def release_fluxworks(self) -> None:
        """Before the core rows: the FluxWorks model leaves the device and its compiled blocks are dropped (their
        caches would keep its modules alive), so core's rows are measured without it."""
        import comfy.model_management as mm

        mm.unload_all_models()
        torch._dynamo.reset()
        self.free()

    # core
    def core_side(self, state: dict, specs: list[RowSpec], positive, latent, sigmas: torch.Tensor) -> None:
        """Every core row through core's nodes: the UNETLoader model from the BFL-keyed weights (core's own loading
        code), FluxGuidance, KSamplerSelect euler, SamplerCustom with FluxWorks' sigmas and seed at cfg 1."""
        import comfy.model_management as mm
        import comfy.sd
        from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom
        from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
        from comfy_extras.nodes_flux import FluxGuidance
        from comfy_extras.nodes_torch_compile import TorchCompileModel

        from fluxworks.devtools.tiny_models import diffusers_to_bfl

        if not specs:
            return
        core_nodes = importlib.import_module("nodes")  # core's nodes.py (start_comfy checked which one it is)
        bfl = diffusers_to_bfl(state)
        cache_nodes = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}
        core_positive = FluxGuidance.execute(conditioning=positive, guidance=self.sampler_kwargs["guidance"]).result[0]
        core_negative = core_nodes.ConditioningZeroOut().zero_out(positive)[0]
        (euler,) = KSamplerSelect.execute(sampler_name="euler").result
        loaded: dict[str, object] = {}
        for spec in specs:
            row = self.start_row(spec)
            if row is None:
                continue

            def body(spec=spec, row=row):
                if spec.weight_dtype not in loaded:
                    loaded.clear()  # one core model (and its compiled clone) in memory at a time
                    mm.unload_all_models()
                    self.free()
                    t = time.perf_counter()
                    model = comfy.sd.load_diffusion_model_state_dict(
                        dict(bfl), model_options=UNET_LOADER_OPTIONS[spec.weight_dtype])
                    if model is None:
                        raise ValueError("core's load_diffusion_model_state_dict did not recognise the BFL weights")
                    loaded[spec.weight_dtype] = model
                    row["core_build_s"] = round(time.perf_counter() - t, 1)
                model = loaded[spec.weight_dtype]
                if spec.compile:  # one TorchCompileModel output feeds the cache rows, as in a workflow
                    key = spec.weight_dtype + "+TorchCompileModel"
                    if key not in loaded:
                        compile_kwargs = row["settings"]["TorchCompileModel"]
                        loaded[key] = TorchCompileModel.execute(model=model, **compile_kwargs).result[0]
                    model = loaded[key]
                if spec.cache_node:
                    node = cache_nodes[spec.cache_node]
                    model = node.execute(model=model, **row["settings"][spec.cache_node]).result[0]
                self.measure(row, lambda: SamplerCustom.execute(
                    model=model, positive=core_positive, negative=core_negative, sampler=euler, sigmas=sigmas,
                    latent_image=latent, **self.core_sampling).result[0]["samples"],
                    CORE_SKIPPED if spec.cache_node else None)

            self.guarded(row, body)
        loaded.clear()
        mm.unload_all_models()
        self.free()

    def run(self, specs: list[RowSpec]) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        state = self.random_state()
        print(f"[{self.elapsed():6.0f} s] random weights: {self.report['params_B']} B parameters",  # noqa: T201
              flush=True)
        positive, latent = self.conditioning_and_latent()
        sigmas = self.fluxworks_side(state, [s for s in specs if s.side == "fluxworks"], positive, latent)
        self.release_fluxworks()
        self.report["sigmas"] = [round(float(s), 6) for s in sigmas]
        self.core_side(state, [s for s in specs if s.side == "core"], positive, latent, sigmas)
        best = add_ratios(self.report["rows"])
        self.report["core_best_mode"] = best
        self.report["total_s"] = round(self.elapsed(), 1)
        self.emit(final=True)
        print(markdown_table(self.report["rows"], best), flush=True)  # noqa: T201


def sampler_sigmas(config, samples: torch.Tensor, sampler_kwargs: dict) -> torch.Tensor:
    """The sigma table FluxWorksSampler.sample builds for these widget values (nodes/sampler.py: shift 0 = the
    resolution-dependent mu for dev, none for schnell; else the constant shift), handed to core's SamplerCustom."""
    from fluxworks.flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len, shift_to_mu

    if sampler_kwargs["shift"] > 0:
        mu = shift_to_mu(sampler_kwargs["shift"])
    elif config.guidance_embeds:
        mu = calculate_mu(image_seq_len(*samples.shape[2:]))
    else:
        mu = None
    return get_sigmas(sampler_kwargs["steps"], mu, sampler_kwargs["denoise"])


def v3_defaults(node) -> dict:
    """A core V3 node's widget values as freshly added: each input's default, a combo's first option."""
    out = {}
    for item in node.define_schema().inputs:
        if getattr(item, "default", None) is not None:
            out[item.id] = item.default
        elif getattr(item, "options", None):
            out[item.id] = item.options[0]
    return out


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    start_comfy(args.comfy, device)
    log = capture_logs()
    from fluxworks.nodes.speed import FluxWorksSpeed, FluxWorksStepCache

    try:
        extra = parse_extra(args.extra, FluxWorksSpeed.INPUT_TYPES(), FluxWorksStepCache.INPUT_TYPES())
        specs = select_rows(args.rows, extra, device == "cuda")
    except ValueError as exc:
        raise SystemExit(f"node_bench: {exc}") from exc
    with torch.inference_mode():  # as ComfyUI runs every node
        NodeBench(args, device, log, started).run(specs)


if __name__ == "__main__":
    main()
