"""bench/server_bench.py: the files it streams are valid safetensors in the layouts core detects, the graphs carry
every widget the server lists, timings are read from the server's messages as documented, the host shims work, and
(slow) `--tiny` runs end to end through real ComfyUI servers with the frontend and PyAV hidden. No timing is
asserted anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fluxworks.bench import server_bench as sb
from tests.paths import REPO, comfyui_path


def test_streamed_file_is_a_safetensors_file_of_the_specs_and_is_reused(tmp_path):
    specs = [sb.TensorSpec("a.weight", (3, 5)), sb.TensorSpec("a.scale", (5,), "norm"),
             sb.TensorSpec("b.alpha", (), "alpha", torch.float32), sb.TensorSpec("c", (2, 2, 3, 3), "linear",
                                                                                 torch.float32)]
    made = {}

    def make(spec):
        made[spec.name] = sb.random_tensor(spec, torch.Generator().manual_seed(0), "cpu")
        return made[spec.name]

    path = str(tmp_path / "x.safetensors")
    assert not sb.already_written(path, specs)
    assert sb.write_safetensors(path, specs, make) == sb.file_size(specs)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == {s.name for s in specs}
        assert f.metadata() == {"format": "pt"}
        for spec in specs:
            t = f.get_tensor(spec.name)
            assert t.dtype == spec.dtype and tuple(t.shape) == spec.shape
            assert torch.equal(t, made[spec.name])
    assert torch.equal(made["a.scale"], torch.ones(5, dtype=torch.bfloat16)) and float(made["b.alpha"]) == 16.0
    assert sb.already_written(path, specs)
    assert not sb.already_written(path, specs[:-1] + [sb.TensorSpec("c", (2, 2, 3, 3))])  # another dtype


def test_full_size_files_have_the_real_sizes_and_the_keys_core_detects_them_by():
    files = {f.role: f for f in sb.model_files(False, {"dev", "t5", "clip_l", "vae", "lora", "schnell"})}
    shapes = {role: {s.name: s.shape for s in f.specs} for role, f in files.items()}
    assert round(files["dev"].params / 1e9, 2) == 11.90 and round(files["t5"].params / 1e9, 2) == 4.76
    assert round(files["clip_l"].params / 1e6) == 124 and round(files["vae"].params / 1e6, 1) == 83.8
    # comfy/model_detection.py (Flux: 24 heads of 128, txt_in / vector_in widths) and sd.py (T5-XXL, 16-ch VAE)
    assert shapes["dev"]["double_blocks.18.img_attn.qkv.weight"] == (9216, 3072)
    assert shapes["dev"]["txt_in.weight"] == (3072, 4096) and shapes["dev"]["vector_in.in_layer.weight"][1] == 768
    assert "guidance_in.in_layer.weight" in shapes["dev"] and "guidance_in.in_layer.weight" not in shapes["schnell"]
    assert shapes["dev"]["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert shapes["t5"]["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"][-1] == 4096
    assert "shared.weight" in shapes["t5"] and "encoder.embed_tokens.weight" not in shapes["t5"]
    assert "text_model.encoder.layers.11.mlp.fc1.weight" in shapes["clip_l"]
    assert shapes["vae"]["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["vae"]["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert "decoder.up.3.upsample.conv.weight" in shapes["vae"] and "decoder.up.0.upsample.conv.weight" not in shapes["vae"]
    assert shapes["lora"]["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"] == (16, 3072)
    assert shapes["lora"]["diffusion_model.single_blocks.37.linear1.lora_up.weight"] == (21504, 16)
    assert not any("_mod." in k or "modulation" in k for k in shapes["lora"])


def test_node_defaults_read_v1_and_v3_object_info_entries():
    v1 = {"input": {"required": {"model": ["FLUX_MODEL"], "compile": ["BOOLEAN", {"default": True}],
                                 "attention": [["auto", "native"], {"default": "auto"}], "mode": [["a", "b"]]},
                    "optional": {"threshold": ["FLOAT", {"default": 0.1}]}}}
    assert sb.node_defaults(v1) == {"compile": True, "attention": "auto", "mode": "a", "threshold": 0.1}
    v3 = {"input": {"required": {"model": ["MODEL", {}], "backend": ["COMBO", {"options": ["inductor", "x"]}]}}}
    assert sb.node_defaults(v3) == {"backend": "inductor"}


def params() -> sb.GraphParams:
    names = {"dev": "d.sft", "schnell": "s.sft", "t5": "t5.sft", "clip_l": "c.sft", "vae": "ae.sft", "lora": "l.sft"}
    return sb.GraphParams(names, 1024, 28, 3.5, {"FluxWorksSpeed": {"compile": True, "fp8_matmul": True},
                                                  "KSampler": {"cfg": 8.0}})


def test_graphs_hold_the_defaults_and_the_settings_they_promise():
    p = params()
    flux = sb.fluxworks_graph(p, "dev", 7, "x", lora=True)
    assert flux["speed"]["inputs"] == {"compile": True, "fp8_matmul": True, "model": ["apply_lora", 0]}
    assert flux[sb.SAMPLER]["inputs"]["seed"] == 7 and flux[sb.SAMPLER]["inputs"]["steps"] == 28
    assert json.loads(flux["lora_stack"]["inputs"]["rows"]) == [{"lora": "l.sft", "strength": 1.0, "enabled": True}]
    assert "lora_stack" not in sb.fluxworks_graph(p, "dev", 7, "x", lora=False)
    core = sb.core_graph(p, 7, "x", lora=True, core_text=True, compile=True)
    assert core["unet"]["inputs"] == {"unet_name": "d.sft", "weight_dtype": "fp8_e4m3fn_fast"}
    assert core["compile"]["inputs"]["model"] == ["lora", 0] and core[sb.SAMPLER]["inputs"]["model"] == ["compile", 0]
    assert core[sb.SAMPLER]["inputs"]["cfg"] == 1.0  # set over the node's default
    assert core["clip"]["class_type"] == "DualCLIPLoader" and core["clip"]["inputs"]["type"] == "flux"
    assert core["guidance"]["inputs"]["guidance"] == 3.5
    tiny_core = sb.core_graph(p, 7, "x", lora=False, core_text=False, compile=False)
    assert tiny_core[sb.ENCODE]["class_type"] == "FluxWorksTextEncode" and "compile" not in tiny_core


def msg(kind: str, **data) -> dict:
    return {"type": kind, "data": {"prompt_id": "p", **data}}


def test_timings_come_from_the_server_timestamps_and_the_progress_messages():
    graph = {"encode": {"class_type": "FluxWorksTextEncode"}, sb.SAMPLER: {"class_type": "FluxWorksSampler"},
             sb.DECODE: {"class_type": "VAEDecode"}}
    timed = [(100.0, msg("execution_start", timestamp=1_000_000)), (100.0, msg("execution_cached", nodes=["vae"])),
             (100.5, msg("executing", node="encode")), (101.0, msg("executing", node=sb.SAMPLER)),
             (104.0, msg("progress", node=sb.SAMPLER, value=1, max=4)),
             (104.1, msg("progress", node=sb.SAMPLER, value=2, max=4)),
             (104.2, msg("progress", node=sb.SAMPLER, value=3, max=4)),
             (104.3, msg("progress", node=sb.SAMPLER, value=4, max=4)),
             (104.4, msg("executing", node=sb.DECODE)), (105.0, msg("execution_success", timestamp=1_005_250))]
    out = sb.prompt_timings(timed, graph)
    assert out["status"] == "success" and out["image_s"] == 5.25 and out["cached_nodes"] == ["vae"]
    assert out["ms_per_step"] == pytest.approx(100.0) and out["steps_seen"] == 4 and out["steps_total"] == 4
    assert out["first_step_s"] == 3.0
    assert out["nodes_s"] == {"encode": {"class_type": "FluxWorksTextEncode", "s": 0.5},
                              sb.SAMPLER: {"class_type": "FluxWorksSampler", "s": 3.4},
                              sb.DECODE: {"class_type": "VAEDecode", "s": 0.6}}
    failed = sb.prompt_timings(timed[:3] + [(101.0, msg("execution_error", node_type="X", exception_type="E",
                                                         exception_message="boom", timestamp=1_001_000))], graph)
    assert failed["status"] == "error" and failed["error"] == "X: E: boom" and "image_s" not in failed


def test_markdown_table_has_a_row_per_graph_and_says_why_one_did_not_run():
    report = {"mode": "tiny (CPU)", "device": "cpu", "comfyui": "0.3.75",
              "settings": {"res": 64, "steps": 2, "schnell_steps": 2, "guidance": 3.5, "seed": 42},
              "graphs": [{"graph": "fluxworks", "prompts": [
                  {"name": "cold", "status": "success", "image_s": 3.0, "ms_per_step": 10.0},
                  {"name": "warm", "status": "success", "image_s": 1.0, "ms_per_step": 9.0,
                   "nodes_s": {"s": {"class_type": "FluxWorksSampler", "s": 0.7}}},
                  {"name": "lora", "skipped": "time budget: 500 s used + ~30 s expected > 520 s"}]},
                  {"graph": "schnell", "prompts": [], "skipped": "time budget: 530 s used"}]}
    table = sb.markdown_table(report)
    assert "| fluxworks | 3.00 | 1.00 | time budget: 500 s used + ~30 s expected > 520 s | 10.00 / 9.00 / — " \
           "| cached | 0.70 | cached |" in table
    assert "| schnell | time budget: 530 s used |" in table


def test_host_shims_stand_in_for_pyav_and_hide_what_the_gpu_machine_lacks(tmp_path):
    paths, notes = sb.host_shims(str(tmp_path), dict(os.environ), simulate_bare_host=True)
    assert set(notes) == {"av", *sb.HIDDEN_ON_BARE_HOST}
    code = ("import av, av.container, av.subtitles.stream\n"
            "assert not hasattr(av, 'open')\n"
            "try:\n    import comfyui_frontend_package\nexcept ModuleNotFoundError:\n    print('hidden')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hidden"


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_run_end_to_end_through_real_servers(tmp_path):
    """`--tiny` on the CPU, frontend/PyAV/database packages hidden: every graph's prompts succeed through POST /prompt,
    and the report holds each prompt's timings, settings and outputs. Core's TorchCompileModel compiles with
    Inductor's C++ backend on the CPU (about a minute on one thread); without a C compiler it is left out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_PATH": comfyui_path()}
    compiler = shutil.which("cc") or shutil.which("gcc")
    done = subprocess.run(
        [sys.executable, "-m", "bench.server_bench", "--tiny", "--simulate-bare-host", "--out", str(tmp_path)]
        + ([] if compiler else ["--no-core-compile"]), env=env, capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "server_bench.json").read_text())
    assert report["mode"] == "tiny (CPU)" and report["host"]["av"].startswith("stand-in")
    assert {"dev", "t5", "clip_l", "vae", "lora", "schnell"} <= set(report["files"])
    graphs = {g["graph"]: g for g in report["graphs"]}
    assert list(graphs) == ["fluxworks", "core", "schnell"]
    for name, graph in graphs.items():
        assert "error" not in graph and "skipped" not in graph, graph
        expected = ["cold", "warm"] + ([] if name == "schnell" else ["lora"])
        assert [p["name"] for p in graph["prompts"]] == expected
        for p in graph["prompts"]:
            assert p["status"] == "success", p
            assert p["images"] == 1 and p["steps_seen"] == graph["steps"]
            for key in ("image_s", "ms_per_step", "first_step_s", "client_s", "nodes_s", "prompt_graph"):
                assert key in p, (name, p["name"], key)
            assert {"FluxWorksSampler", "KSampler"} & {n["class_type"] for n in p["nodes_s"].values()}
        assert not graph["log_warnings"], graph["log_warnings"]  # no missing VAE keys, unloaded LoRA keys
        lora = [p for p in graph["prompts"] if p["lora"]]
        assert all(("apply_lora" if name != "core" else "lora") in p["prompt_graph"] for p in lora)
    assert "FluxWorksSpeed" in json.dumps(graphs["fluxworks"]["prompts"][0]["prompt_graph"])
    core = graphs["core"]["prompts"][0]["prompt_graph"]
    assert core["unet"]["inputs"]["weight_dtype"] == "fp8_e4m3fn_fast"
    assert ("compile" in core) == bool(compiler)
    # the warm prompt re-ran only what its new seed changes: the loaders came from ComfyUI's cache
    assert "model" in graphs["fluxworks"]["prompts"][1]["cached_nodes"]
    assert "| graph | cold s | warm s | warm after LoRA change s |" in done.stdout


CORE_LAYOUTS = """
import json, os, sys
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.clip_model, comfy.ops, comfy.text_encoders.t5
from comfy.ldm.models.autoencoder import AutoencodingEngine
from fluxworks.bench import server_bench as sb
here = os.path.dirname(comfy.clip_model.__file__)
with open(os.path.join(here, "text_encoders", "t5_config_xxl.json")) as f:
    t5 = comfy.text_encoders.t5.T5(json.load(f), torch.bfloat16, "meta", comfy.ops.manual_cast)
with open(os.path.join(here, "sd1_clip_config.json")) as f:
    clip = comfy.clip_model.CLIPTextModel(json.load(f), torch.bfloat16, "meta", comfy.ops.manual_cast)
ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
with torch.device("meta"):  # what comfy/sd.py builds for a 16-channel ldm-layout VAE
    ae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
for name, model, specs in (("t5", t5, sb.t5_specs(sb.FULL_T5)), ("clip_l", clip, sb.clip_specs(sb.FULL_CLIP)),
                           ("vae", ae, sb.ae_specs())):
    core = {k: list(v.shape) for k, v in model.state_dict().items()}
    mine = {s.name: list(s.shape) for s in specs}
    print(json.dumps([name, core == mine, sorted(set(core) ^ set(mine))[:5]]))
"""


@pytest.mark.slow
def test_full_size_text_encoders_and_ae_have_exactly_the_tensors_cores_models_hold():
    """The full-size T5-XXL, CLIP-L and ae files hold exactly the state dict (names and shapes) of the models core
    builds for them (built on the meta device: no memory), so DualCLIPLoader and VAELoader load them whole."""
    env = {**os.environ, "PYTHONPATH": comfyui_path(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CORE_LAYOUTS], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert lines == [["t5", True, []], ["clip_l", True, []], ["vae", True, []]], lines
