"""bench/node_bench.py: the node settings it times are the ones a freshly added node holds, extra rows from the
command line are checked against the nodes' inputs, the rows and ratios are the ones the report promises, the
caches' reuse counts are read from the lines the sampler and core log, and (slow) the script runs end to end on
the CPU with the same sigmas and noise on both sides."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fluxworks.bench import node_bench as nb
from tests.lora.conftest import pack  # noqa: F401 - the shared in-process host fixture
from tests.paths import REPO, comfyui_path

SPEED = {"required": {"model": ("FLUX_MODEL",), "compile": ("BOOLEAN", {"default": True}),
                      "attention": (["auto", "native"], {"default": "auto"})},
         "optional": {"fp8_scaling": (["rowwise", "tensorwise"],)}}
CACHE = {"required": {"model": ("FLUX_MODEL",), "threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 2.0}),
                      "max_consecutive": ("INT", {"default": 3, "min": 1, "max": 100})}}


def test_widget_defaults_are_what_a_fresh_node_holds():
    assert nb.widget_defaults("Speed", SPEED) == {"compile": True, "attention": "auto", "fp8_scaling": "rowwise"}
    assert nb.widget_defaults("Cache", CACHE) == {"threshold": 0.1, "max_consecutive": 3}
    with pytest.raises(ValueError, match="X.k has no default"):
        nb.widget_defaults("X", {"required": {"k": ("FLOAT", {})}})


def test_extra_rows_apply_speed_defaults_and_a_step_cache_only_when_given():
    rows = nb.parse_extra('[{"speed": {"compile": false}}, {"cache": {"threshold": 0.3}, "name": "t03"}, '
                          '{"speed": null, "cache": {}}]', SPEED, CACHE)
    assert [r.name for r in rows] == ["fluxworks_extra_0", "fluxworks_extra_t03", "fluxworks_extra_2"]
    assert (rows[0].speed, rows[0].cache) == ({"compile": False}, None)
    assert (rows[1].speed, rows[1].cache) == ({}, {"threshold": 0.3})
    assert (rows[2].speed, rows[2].cache) == (None, {})
    assert all(r.side == "fluxworks" for r in rows)


@pytest.mark.parametrize("text, message", [
    ("[{speed}]", "not valid JSON"),
    ('{"speed": {}}', "must be a JSON list"),
    ('[{"sped": {}}]', "keys 'speed', 'cache' and 'name'"),
    ('[{"speed": {"compil": true}}]', "Speed has no input 'compil'"),
    ('[{"speed": {"attention": "fast"}}]', "'fast' is not one of"),
    ('[{"speed": {"compile": 1}}]', "is a BOOLEAN"),
    ('[{"cache": {"max_consecutive": true}}]', "is a INT"),
    ('[{"cache": {"threshold": 5}}]', r"outside \[0.0, 2.0\]"),
    ('[{"name": "a"}, {"name": "a"}]', "repeated"),
])
def test_bad_extra_rows_are_rejected_with_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        nb.parse_extra(text, SPEED, CACHE)


def test_row_selection_keeps_the_reference_and_puts_extras_before_core():
    extra = nb.parse_extra('[{"speed": {"compile": false}}]', SPEED, CACHE)
    assert [s.name for s in nb.select_rows("core_bf16", extra, True)] == [nb.REFERENCE, "core_bf16"]
    on_gpu = [s.name for s in nb.select_rows("all", extra, True)]
    assert on_gpu == [nb.REFERENCE, "fluxworks_speed", "fluxworks_speed_cache", "fluxworks_extra_0", "core_bf16",
                      "core_fp8_fast", "core_fp8_fast_easycache", "core_fp8_fast_lazycache", nb.CORE_BEST]
    on_cpu = [s.name for s in nb.select_rows("all", [], False)]  # the uncompiled cache rows check that path
    assert {"core_fp8_fast_easycache", "core_fp8_fast_lazycache", nb.CORE_BEST} <= set(on_cpu)
    with pytest.raises(ValueError, match=r"unknown \['core_fp16'\]"):
        nb.select_rows("all,core_fp16", [], True)


def row(mode: str, side: str, ms: float | None, **settings) -> dict:
    out = {"mode": mode, "label": mode, "side": side, "settings": settings}
    if ms is not None:
        out.update(ms_per_step=ms, warmup_s=1.0)
    return out


def test_ratios_are_against_core_best_mode_or_the_fastest_core_row_that_skips_nothing():
    rows = [row(nb.REFERENCE, "fluxworks", 100.0), row("core_bf16", "core", 200.0),
            row("core_fp8_fast", "core", 150.0), row(nb.CORE_BEST, "core", 80.0),
            row("core_fp8_fast_compile_easycache", "core", 40.0, EasyCache={"reuse_threshold": 0.2})]
    assert nb.add_ratios(rows) == nb.CORE_BEST
    assert (rows[0]["x_core_best"], rows[0]["x_core_bf16"]) == (0.8, 2.0)
    without_compile = [r for r in rows if r["mode"] != nb.CORE_BEST]
    assert nb.add_ratios(without_compile) == "core_fp8_fast"  # the 40 ms cache row skips steps
    assert without_compile[0]["x_core_best"] == 1.5


def test_reuse_counts_come_from_the_last_cache_line_of_the_run():
    fluxworks = ["FluxWorksSampler: step cache reused the deep blocks on 2 of 28 model evaluations (steps [3, 4])",
                 "FluxWorksSampler: step cache reused the deep blocks on 5 of 28 model evaluations (steps [3])"]
    assert nb.parse_reuse(fluxworks, nb.FLUXWORKS_REUSE) == (5, 28)
    assert nb.parse_reuse(["LazyCache - skipped 7/28 steps (1.33x speedup)."], nb.CORE_SKIPPED) == (7, 28)
    assert nb.parse_reuse(["Requested to load Flux"], nb.CORE_SKIPPED) is None


def test_markdown_table_names_shared_settings_once_and_every_row_or_why_not():
    sampler = {"FluxWorksSampler": {"seed": 42, "steps": 28}}
    rows = [row(nb.REFERENCE, "fluxworks", 100.0, **sampler),
            row("fluxworks_speed", "fluxworks", 50.0, FluxWorksSpeed={"compile": True}, **sampler),
            row(nb.CORE_BEST, "core", None, UNETLoader={"weight_dtype": "fp8_e4m3fn_fast"}, SamplerCustom={"cfg": 1.0})]
    rows[1].update(rel_error=0.0045, peak_gib=22.5)
    rows[2]["skipped"] = "needs a GPU (TorchCompileModel)"
    table = nb.markdown_table(rows, None)
    assert "Every fluxworks row: FluxWorksSampler(seed=42, steps=28)" in table
    assert "Every core row: SamplerCustom(cfg=1.0)" in table
    assert f"| {nb.REFERENCE} | no Speed node | 100.0 |" in table and "0 (reference)" in table
    assert "| FluxWorksSpeed(compile=True) | 50.0 | — | — | 22.50 | 1.0 | 0.0045 | — |" in table
    assert "| UNETLoader(weight_dtype=fp8_e4m3fn_fast) | needs a GPU (TorchCompileModel) |" in table


def test_a_row_starts_only_when_its_expected_end_is_within_the_budget():
    assert nb.over_budget(400.0, 80.0, 480.0) is None
    assert nb.over_budget(400.0, 85.0, 480.0) == "time budget: 400 s used + ~85 s expected > 480 s"
    assert nb.over_budget(10_000.0, 85.0, None) is None


def test_relative_error():
    reference = torch.tensor([3.0, 4.0])
    assert nb.rel_error(reference.clone(), reference) == 0.0
    assert nb.rel_error(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)


def test_the_real_nodes_defaults_and_the_briefs_example_extra_rows(pack):  # noqa: F811
    """The contract with the nodes: every widget has a default, the sampler has the widgets the sigma table and
    core's sampler read, and the documented --extra example passes the real nodes' checks."""
    sampler = importlib.import_module("fluxworks.nodes.sampler").FluxWorksSampler
    speed = importlib.import_module("fluxworks.nodes.speed")
    assert {"seed", "steps", "guidance", "shift", "denoise"} <= set(
        nb.widget_defaults("FluxWorksSampler", sampler.INPUT_TYPES()))
    speed_types, cache_types = speed.FluxWorksSpeed.INPUT_TYPES(), speed.FluxWorksStepCache.INPUT_TYPES()
    defaults = nb.widget_defaults("FluxWorksSpeed", speed_types)
    assert set(defaults) == set(speed_types["required"]) - {"model"} | set(speed_types.get("optional", {}))
    rows = nb.parse_extra('[{"speed": {"compile": false}}, {"cache": {"threshold": 0.3}}]', speed_types, cache_types)
    assert [r.name for r in rows] == ["fluxworks_extra_0", "fluxworks_extra_1"]


@pytest.mark.slow
def test_tiny_run_end_to_end_on_the_cpu(tmp_path):
    """The script on the CPU (1+1 blocks of width 3072, 64x64, 2 steps): FluxWorks and core, through their nodes,
    with the same weights, sigmas and noise, end at the same latent (fp32: measured 1.05e-7; bound 3e-7), and the
    step cache's reuse count is read."""
    env = {**os.environ, "PYTHONPATH": comfyui_path()}
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "node_bench.py"), "--tiny", "--comfy", comfyui_path(),
         "--repeats", "1", "--rows", "fluxworks_speed_cache,core_bf16", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "node_bench.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == [nb.REFERENCE, "fluxworks_speed_cache", "core_bf16"]
    assert all("ms_per_step" in r for r in rows.values()), [r.get("error") for r in rows.values()]
    assert rows["core_bf16"]["rel_error"] < 3e-7
    assert isinstance(rows["fluxworks_speed_cache"]["steps_reused"], int)
    assert report["core_best_mode"] == "core_bf16" and rows["core_bf16"]["x_core_best"] == 1.0
    assert report["sigmas"][0] == 1.0 and report["sigmas"][-1] == 0.0 and len(report["sigmas"]) == 3
    assert "| mode | node settings | ms/step |" in done.stdout
