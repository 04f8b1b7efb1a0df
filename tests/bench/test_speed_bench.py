"""bench/speed_bench.py: its command line rejects bad input naming the fix, its helpers compute what the report
says (fp8 block sizes, resident blocks under a cap, merged fp8 variants), its sampling loop is exactly the
FluxWorks Sampler's `sample_prepared`, and (slow) the script runs end to end on the CPU; bench/plot_speed.py reads
its reports, old and new."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fluxworks.bench import plot_speed
from fluxworks.bench import speed_bench as sb
from tests.lora.conftest import pack  # noqa: F401 - the shared in-process host fixture
from tests.paths import REPO, comfyui_path


def test_sections_are_checked_and_the_removed_comfy_section_names_node_bench():
    assert sb.parse_sections("all") == frozenset({"all"})
    with pytest.raises(ValueError, match="removed.*node_bench.*comfy_bf16"):
        sb.parse_sections("fp8,comfy")
    with pytest.raises(ValueError, match=r"unknown \['fp9'\]"):
        sb.parse_sections("fp9")
    with pytest.raises(ValueError, match="unknown"):
        sb.parse_sections(" , ")


def test_all_leaves_out_the_opt_in_fp8_variants():
    everything = frozenset({"all"})
    assert all(sb.wants(everything, s) for s in sb.SECTIONS if s != "fp8_variants")
    assert not sb.wants(everything, "fp8_variants")
    assert sb.wants(frozenset({"all", "fp8_variants"}), "fp8_variants")
    assert not sb.wants(frozenset({"fp8"}), "cache")


def test_command_line_defaults_and_errors(capsys):
    args = sb.parse_args(["--tiny"])
    assert (args.steps, args.res) == (6, 64)
    args = sb.parse_args([])
    assert (args.steps, args.res) == (28, 1024)
    for argv, message in ((["--steps", "2"], "--steps must be at least 3"), (["--res", "100"], "multiple of 16"),
                          (["--offload-resident", "-1"], "block count"), (["--sections", "comfy"], "node_bench"),
                          (["--fp8-variants", "fast"], "unknown ['fast']")):
        with pytest.raises(SystemExit):
            sb.parse_args(argv)
        assert message in capsys.readouterr().err


def test_cache_configs_parse_and_bad_ones_name_the_entry():
    configs = sb.parse_cache_configs("0.6:0.1:0.9:3, 1:0.05:0.95:6,")
    assert [(c.threshold, c.start_percent, c.end_percent, c.max_consecutive) for c in configs] == [
        (0.6, 0.1, 0.9, 3), (1.0, 0.05, 0.95, 6)]
    assert sb.parse_cache_configs("") == []
    assert sb.cache_tag("ours_fp8_attn_compile", configs[0]) == "ours_fp8_attn_compile_cache0.6_0.1-0.9_max3"
    with pytest.raises(ValueError, match="threshold:start:end:max_consecutive.*'0.6:0.1'"):
        sb.parse_cache_configs("0.6:0.1")
    with pytest.raises(ValueError, match="'0.6:0.9:0.1:3'.*window"):
        sb.parse_cache_configs("0.6:0.9:0.1:3")


def test_faster_variants_are_merged_with_the_faster_value_winning():
    timed = {"fast_accum": 95.0, "calibrated": 99.0, "calibrated_tensorwise": 90.0, "tuned": 101.0}
    merged = sb.faster_variants_together(timed, baseline_ms=100.0)
    # calibrated (99) and calibrated_tensorwise (90) both set fp8_activations; tensorwise (faster) adds its scaling
    assert merged == {"fp8_activations": "calibrated", "fp8_scaling": "tensorwise", "fp8_fast_accum": True}
    assert sb.faster_variants_together(timed, baseline_ms=80.0) == {}


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_fp8_block_bytes_match_the_quantised_blocks(scaling):
    """The estimate the memory section budgets with, against the blocks `quantize_transformer_linears` makes:
    exact for rowwise, an upper bound within 1 % for tensorwise (one scale per tensor instead of per row; measured
    0.8 % over on the tiny model)."""
    from fluxworks.devtools.tiny_models import random_flux
    from fluxworks.flux_speed.fp8_linear import quantize_transformer_linears
    from fluxworks.flux_speed.prepare import transformer_blocks

    model = random_flux("dev", 0)
    estimates = [sb.fp8_block_bytes(b) for b in transformer_blocks(model)]
    quantize_transformer_linears(model, torch.float32, scaling=scaling)
    actual = [sb.tensor_bytes(list(b.parameters()) + list(b.buffers())) for b in transformer_blocks(model)]
    if scaling == "rowwise":
        assert estimates == actual
    else:
        assert all(a <= e <= 1.01 * a for e, a in zip(estimates, actual, strict=True)), (estimates, actual)


def test_resident_blocks_fill_what_the_cap_leaves():
    gib = 2**30
    sizes = [gib] * 10
    # 16 GiB - 1 fixed - 3 activations - 3 in flight = 9 GiB: nine blocks
    assert sb.resident_blocks(sizes, gib, 16 * gib, 3 * gib) == 9
    assert sb.resident_blocks(sizes, gib, 8 * gib, 3 * gib) == 1
    assert sb.resident_blocks(sizes, gib, 6 * gib, 3 * gib) == 0
    assert sb.resident_blocks(sizes, 0, 100 * gib, 0) == 10
    assert sb.resident_blocks([], 0, gib, 0) == 0


def test_change_summary():
    assert sb.change_summary([]) == {}
    assert sb.change_summary([0.3, 0.1, 0.2]) == {"count": 3, "min": 0.1, "median": 0.2, "max": 0.3}


def test_the_bench_samples_exactly_as_sample_prepared(pack):  # noqa: F811
    """Every row runs `SpeedBench.sample` on a prepared transformer; with a step cache (the path with the most
    per-call state) it must give the FluxWorks Sampler's `sample_prepared` result bit for bit, and report the same
    cache counts."""
    from fluxworks.flux_sampler import GuidanceCurve, TextConditioning, calculate_mu, get_sigmas
    from fluxworks.flux_sampler.latents import make_noise, to_vae_space
    from fluxworks.flux_sampler.schedule import image_seq_len
    from fluxworks.flux_speed.prepare import SpeedOptions, sample_prepared
    from fluxworks.flux_speed.step_cache import StepCacheConfig

    bench = sb.SpeedBench(sb.parse_args(["--tiny", "--steps", "6", "--out", "unused"]))
    bench.flux = bench.new_flux()
    options = SpeedOptions(cache=StepCacheConfig(0.65, 0.1, 0.9, 3))
    with torch.inference_mode():
        prepared = bench.prepare_row("t", options)
        _, latent = bench.sample(prepared, 6)
        shape = (1, 16, bench.lat, bench.lat)
        x, _, reference = sample_prepared(
            bench.flux, options, bench.device, bench.dtype, interrupt=bench.interrupt, guidance_embeds=True,
            positive=TextConditioning(bench.embeds, bench.pooled), negative=None, latent=torch.zeros(shape),
            noise=make_noise(shape, 42), sigmas=get_sigmas(6, calculate_mu(image_seq_len(bench.lat, bench.lat))),
            curve=GuidanceCurve.constant(3.5))
    assert torch.equal(latent, to_vae_space(x))
    assert sb.cache_record(prepared.cache) == sb.cache_record(reference.cache)
    assert prepared.cache.hits > 0  # the reuse path ran (threshold above the ~0.62 change the probe measures)
    assert bench.report["t_options"]["cache"]["threshold"] == 0.65


@pytest.mark.slow
def test_tiny_run_end_to_end_on_the_cpu(tmp_path):
    """The script on the CPU: the reference, a cache row with its counts, block offload, every row's options."""
    env = {**os.environ, "PYTHONPATH": comfyui_path()}
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "speed_bench.py"), "--tiny", "--comfy", comfyui_path(),
         "--steps", "4", "--sections", "cache,offload_node", "--cache-configs", "0.65:0.1:0.9:3",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "flux_speed.json").read_text())
    assert not [k for k in report if k.endswith("_error")], {k: v for k, v in report.items() if k.endswith("_error")}
    assert report["ours_eager_bf16_options"]["attention"] == "native"
    (row,) = report["cache_rows"]
    assert row["hits"] + row["misses"] == 4 and row["steps_reused"] == len(row["reused_steps"])
    assert report["ours_node_fp8_offload_cap8gib_options"]["offload_resident_blocks"] == 1
    assert report["ours_node_fp8_offload_cap8gib_rel_err_vs_bf16"] == 0.0  # offload streams, changes nothing
    assert report["no_speed_node_rows"] == ["ours_bf16_attn"]
    labels = [label for label, _ in plot_speed.bars(report)]  # the keys the plot reads are the ones written
    assert labels[0] == "FluxWorks eager bf16" and "FluxWorks Speed defaults + offload, 8 GiB cap" in labels
    assert labels[-1] == f"FluxWorks bf16 + compile + cache t=0.65 ({row['steps_reused']}/4 reused)"


def test_plot_reads_the_reports_written_before_the_port():
    with open(os.path.join(REPO, "docs", "bench", "speed_h200_2026-11-26_final.json"), encoding="utf-8") as f:
        bars = dict(plot_speed.bars(json.load(f)))
    assert bars["ComfyUI core bf16 (plain comfy.sample)"] == 171.13 and bars["FluxWorks fp8 rowwise + compile"] == 104.78
    assert bars["FluxWorks fp8 rowwise + compile + cache t=0.6 (17/28 reused)"] == 43.34
