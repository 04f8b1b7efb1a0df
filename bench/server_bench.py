"""Node-path server benchmark: what a user of a real ComfyUI server waits for, FluxWorks against core's best mode.

Writes random weight files in the formats people download (a BFL-format FLUX.1 transformer, ComfyUI-layout T5-XXL
and CLIP-L, a FLUX `ae.safetensors` in its real key layout, a rank-16 LoRA in the BFL/ComfyUI LoRA layout that both
stacks load), starts a real ComfyUI server (the host's own main.py, the pack linked into its custom_nodes) once per
graph, queues prompts through POST /prompt and times them from the websocket messages the server sends:

  fluxworks  FluxWorksModelLoader + FluxWorksTextEncoderLoader + FluxWorksTextEncode + FluxWorksSpeed (node defaults)
             + FluxWorksSampler + VAELoader/VAEDecode + SaveImage
  core       UNETLoader(fp8_e4m3fn_fast) + TorchCompileModel + DualCLIPLoader(flux) + CLIPTextEncode + FluxGuidance
             + ConditioningZeroOut + KSampler(euler, simple, cfg 1) + VAELoader/VAEDecode + SaveImage
  schnell    the fluxworks graph on a FLUX.1-schnell transformer, 4 steps: end to end (encode + denoise + decode)

Prompts per graph: cold (the server's first prompt: load + compile + sample), warm (the same graph, new seed; schnell:
new seed and new prompt text, so the text encoders run too), and for fluxworks and core "after a LoRA change" (the
same graph with one rank-16 LoRA added: FluxWorksLoraStack + FluxWorksApplyLoraStack / LoraLoaderModelOnly before
TorchCompileModel, new seed). Per prompt: image s (server timestamps, execution_start -> execution_success), each
executed node's seconds and the sampler's ms/step (first -> last sampler progress message, receive times), the steps
seen, and the nodes ComfyUI served from its cache. Every node setting of every prompt is in the report
(`prompt_graph`); the widget values not set here are the defaults the server's /object_info gives.

Each graph gets a fresh server with empty Inductor and Triton caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR in a
new folder), so "cold" is a first prompt with nothing compiled; the weight files were just written, so they are read from the page cache.

The host need not have ComfyUI's frontend or PyAV: the server runs with --front-end-root on an empty folder (no
comfyui-frontend-package import), and where `import av` fails (ComfyUI 0.3.75 imports PyAV at startup from
comfy_api.latest and comfy_extras even though no graph here touches video), a stand-in `av` package is written to a
temporary folder on the server's PYTHONPATH. --simulate-bare-host hides the packages the GPU machine lacks
(frontend, templates, docs, alembic, SQLAlchemy, kornia, spandrel, pydantic) and uses the stand-in even where PyAV
is installed, to check that trick on a full install.

Usage (repo root; the package `fluxworks` importable: `pip install -e .` here, a link on PYTHONPATH on the GPU):
  here:  OMP_NUM_THREADS=1 .venv/bin/python -m bench.server_bench --tiny [--simulate-bare-host]
  GPU:   mkdir -p /tmp/pk && ln -sfn $PWD /tmp/pk/fluxworks && \\
         PYTHONPATH=/tmp/pk:/tmp/site python3 -m bench.server_bench --comfy .comfy --budget-s 540
         [--graphs fluxworks,core,schnell] [--res 1024] [--steps 28] [--schnell-steps 4] [--seed 42]
         [--models-dir DIR] [--out DIR]
--tiny: small files of the same formats on the CPU (a 1+1-block transformer of width 3072, the width core's
UNETLoader assumes; tiny T5/CLIP; the real-layout ae), 64x64, 2 steps. Core's DualCLIPLoader always builds a
full-size 4.7 B T5-XXL (comfy/text_encoders/sd3_clip.py reads t5_config_xxl.json), so in --tiny the core graph
encodes its prompt with FluxWorks' text nodes; the full run uses DualCLIPLoader + CLIPTextEncode.
--budget-s: prompts that would end past it are skipped (the report says which); a prompt still running at the
budget is interrupted. The report is rewritten after every prompt (OUT/server_bench.json), printed as one JSON
line at the end, then as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import websocket

from devtools.comfy_server import ComfyServer, PromptResult, free_port
from devtools.paths import REPO, comfyui_path

# --- model files ----------------------------------------------------------------------------------------------------

# FLUX.1-dev / schnell (diffusers' FluxTransformer2DModel defaults are FLUX.1's sizes), T5-XXL v1.1 encoder, CLIP-L.
FULL_FLUX = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(FULL_FLUX, num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=64)
FULL_T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)
FULL_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=49408, max_position_embeddings=77)
LORA_RANK = 16
# BFL layer names a LoRA trainer targets by default (attention and MLP of every block).
LORA_LAYERS = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
               "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str = "linear"  # linear: N(0, 1/fan_in); norm: 1; small: N(0, 0.02^2); embed: N(0, 1); zero
    dtype: torch.dtype = torch.bfloat16

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def flux_specs(config: dict, guidance: bool) -> list[TensorSpec]:
    """Every tensor of a BFL-format FLUX.1 file (flux1-dev.safetensors layout), from diffusers' model built on the
    meta device and renamed by devtools.tiny_models.diffusers_to_bfl (which checks the round trip)."""
    from diffusers import FluxTransformer2DModel

    from devtools.tiny_models import diffusers_to_bfl

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=guidance, **config)
    bfl = diffusers_to_bfl(dict(model.state_dict()))
    out = []
    for name, t in bfl.items():
        if t.ndim >= 2:
            init = "linear"
        elif name.endswith(".scale"):
            init = "norm"
        else:
            init = "small"
        out.append(TensorSpec(name, tuple(t.shape), init))
    return out


def t5_specs(config: dict) -> list[TensorSpec]:
    """ComfyUI's T5-XXL file layout (t5xxl_fp16.safetensors): `encoder.*` and `shared.weight`."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                        tie_word_embeddings=False, **config))
    out = []
    for name, t in model.state_dict().items():
        if name == "encoder.embed_tokens.weight":  # the same tensor as shared.weight; ComfyUI's files hold shared
            continue
        if name == "shared.weight":
            init = "embed"
        elif "relative_attention_bias" in name:
            init = "small"
        elif t.ndim == 1:
            init = "norm"
        else:
            init = "linear"
        out.append(TensorSpec(name, tuple(t.shape), init))
    return out


def clip_specs(config: dict) -> list[TensorSpec]:
    """ComfyUI's CLIP-L file layout (clip_l.safetensors): `text_model.*` plus `text_projection.weight`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", projection_dim=config["hidden_size"],
                                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **config))
    out = []
    for name, t in model.state_dict().items():
        name = name if name.startswith("text_model.") else "text_model." + name
        if "embedding" in name:
            init = "small"
        elif "layer_norm" in name and name.endswith(".weight"):
            init = "norm"
        elif t.ndim == 1:
            init = "zero"
        else:
            init = "linear"
        out.append(TensorSpec(name, tuple(t.shape), init))
    out.append(TensorSpec("text_projection.weight", (config["hidden_size"],) * 2))
    return out


def ae_specs() -> list[TensorSpec]:
    """FLUX.1's autoencoder (ae.safetensors): the ldm Encoder/Decoder layout with ch 128, ch_mult (1, 2, 4, 4), two
    res blocks per level, one mid attention, 16 latent channels, no quant convs; fp32 as BFL ships it."""
    ch, mult, res_blocks, z = 128, (1, 2, 4, 4), 2, 16
    out: list[TensorSpec] = []

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        out.append(TensorSpec(name + ".weight", (cout, cin, k, k), "linear", torch.float32))
        out.append(TensorSpec(name + ".bias", (cout,), "zero", torch.float32))

    def norm(name: str, c: int) -> None:
        out.append(TensorSpec(name + ".weight", (c,), "norm", torch.float32))
        out.append(TensorSpec(name + ".bias", (c,), "zero", torch.float32))

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(prefix: str, c: int) -> None:
        resnet(prefix + ".mid.block_1", c, c)
        norm(prefix + ".mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{part}", c, c, 1)
        resnet(prefix + ".mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for level, m in enumerate(mult):
        block_in = ch * ((1,) + mult)[level]
        for i in range(res_blocks):
            resnet(f"encoder.down.{level}.block.{i}", block_in, ch * m)
            block_in = ch * m
        if level != len(mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z, block_in, 3)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for level in reversed(range(len(mult))):
        for i in range(res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{i}", block_in, ch * mult[level])
            block_in = ch * mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)
    return out


def lora_specs(flux: list[TensorSpec], rank: int = LORA_RANK) -> list[TensorSpec]:
    """A rank-`rank` LoRA on every attention and MLP layer in the BFL/ComfyUI LoRA layout (`diffusion_model.<layer>`
    + lora_down / lora_up / alpha), which core's LoraLoader and FluxWorks' LoRA stack both read."""
    out = []
    for spec in flux:
        layer = spec.name[: -len(".weight")] if spec.name.endswith(".weight") else ""
        if spec.init != "linear" or not layer.endswith(LORA_LAYERS):
            continue
        rows, cols = spec.shape
        key = "diffusion_model." + layer
        out.append(TensorSpec(key + ".lora_down.weight", (rank, cols), "linear"))
        out.append(TensorSpec(key + ".lora_up.weight", (rows, rank), "lora_up"))
        out.append(TensorSpec(key + ".alpha", (), "alpha", torch.float32))
    return out


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `specs` in order (padded to 8 bytes)."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size(specs: list[TensorSpec]) -> int:
    return len(safetensors_header(specs)) + sum(spec.nbytes for spec in specs)


def already_written(path: str, specs: list[TensorSpec]) -> bool:
    """True when `path` is a complete file of exactly these tensors (same header, same size): reused, not redrawn."""
    header = safetensors_header(specs)
    if not os.path.isfile(path) or os.path.getsize(path) != file_size(specs):
        return False
    with open(path, "rb") as f:
        return f.read(len(header)) == header


def random_tensor(spec: TensorSpec, generator: torch.Generator, device: str) -> torch.Tensor:
    """Drawn on `device` (the GPU when there is one: fast), scaled like a usual initialisation so activations stay
    O(1) through the network."""
    if spec.init == "norm":
        return torch.ones(spec.shape, dtype=spec.dtype)
    if spec.init == "zero":
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if spec.init == "alpha":
        return torch.tensor(float(LORA_RANK), dtype=spec.dtype)
    t = torch.randn(spec.shape, generator=generator, device=device, dtype=torch.float32)
    if spec.init == "linear":
        t *= math.prod(spec.shape[1:]) ** -0.5
    elif spec.init in ("small", "lora_up"):
        t *= 0.02 if spec.init == "small" else 1e-3
    return t.to(spec.dtype)


def write_safetensors(path: str, specs: list[TensorSpec], make: Callable[[TensorSpec], torch.Tensor]) -> int:
    """Write a safetensors file one tensor at a time (header first, then each tensor's bytes as it is made), so host
    memory holds one tensor, not the model; a temporary name until complete. Returns the bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(safetensors_header(specs))
        for spec in specs:
            t = make(spec).to("cpu", spec.dtype).contiguous()
            if tuple(t.shape) != spec.shape:
                raise ValueError(f"{spec.name}: made {tuple(t.shape)}, expected {spec.shape}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    os.replace(partial, path)
    return os.path.getsize(path)


@dataclass
class ModelFile:
    role: str
    folder: str  # under models/
    name: str
    specs: list[TensorSpec]
    seed: int

    @property
    def params(self) -> int:
        return sum(spec.numel for spec in self.specs)


def model_files(tiny: bool, roles: set[str]) -> list[ModelFile]:
    """The files a run needs: dev, t5, clip_l, vae, lora (fluxworks/core graphs), schnell (schnell graph)."""
    flux_config = TINY_FLUX if tiny else FULL_FLUX
    size = "tiny" if tiny else "full"
    dev = flux_specs(flux_config, guidance=True)
    files = {
        "dev": ModelFile("dev", "diffusion_models", f"flux1-dev-random-{size}.safetensors", dev, 1),
        "t5": ModelFile("t5", "text_encoders", f"t5xxl-random-{size}_bf16.safetensors",
                        t5_specs(TINY_T5 if tiny else FULL_T5), 2),
        "clip_l": ModelFile("clip_l", "text_encoders", f"clip_l-random-{size}.safetensors",
                            clip_specs(TINY_CLIP if tiny else FULL_CLIP), 3),
        "vae": ModelFile("vae", "vae", "ae-random.safetensors", ae_specs(), 4),
        "lora": ModelFile("lora", "loras", f"flux1-dev-lora-random-r{LORA_RANK}-{size}.safetensors",
                          lora_specs(dev), 5),
        "schnell": ModelFile("schnell", "diffusion_models", f"flux1-schnell-random-{size}.safetensors",
                             flux_specs(flux_config, guidance=False), 6),
    }
    return [files[role] for role in files if role in roles]


# tiny text encoders: ComfyUI layouts at devtools.tiny_models' sizes (joint_attention_dim / pooled width 64)
TINY_T5 = dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, vocab_size=32128)
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 vocab_size=49408, max_position_embeddings=77)


# --- the host: packages ComfyUI imports at startup that the GPU machine lacks --------------------------------------------

HIDDEN_ON_BARE_HOST = ("comfyui_frontend_package", "comfyui_workflow_templates", "comfyui_embedded_docs", "alembic",
                       "sqlalchemy", "kornia", "spandrel", "pydantic", "pydantic_settings")
AV_STUB = {
    "av/__init__.py": '"""Stand-in for PyAV, written by bench/server_bench.py: ComfyUI 0.3.75 imports av when it\n'
                      'starts (comfy_api.latest, comfy_extras video/audio nodes); the benchmark graphs never use it."""\n'
                      "\n\ndef __getattr__(name):\n"
                      "    raise AttributeError(f'av.{name}: PyAV is not installed (server_bench stand-in)')\n",
    "av/container.py": "class InputContainer:  # only named in annotations\n    pass\n",
    "av/subtitles/__init__.py": "",
    "av/subtitles/stream.py": "class SubtitleStream:  # only named in annotations\n    pass\n",
}


def importable(module: str, env: dict[str, str]) -> bool:
    """Whether the server's Python, with `env`, finds `module` (checked in a child: PYTHONPATH as the server has it)."""
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def host_shims(folder: str, env: dict[str, str], simulate_bare_host: bool) -> tuple[list[str], dict[str, str]]:
    """Folders to put ahead on the server's PYTHONPATH and what each shim does: the `av` stand-in where PyAV is not
    importable (always with simulate_bare_host), and with simulate_bare_host a module per HIDDEN_ON_BARE_HOST name
    that raises ModuleNotFoundError, as on a host without it."""
    notes: dict[str, str] = {}
    paths: list[str] = []
    if simulate_bare_host or not importable("av", env):
        stub = os.path.join(folder, "av_stub")
        for rel, text in AV_STUB.items():
            os.makedirs(os.path.dirname(os.path.join(stub, rel)), exist_ok=True)
            with open(os.path.join(stub, rel), "w", encoding="utf-8") as f:
                f.write(text)
        paths.append(stub)
        notes["av"] = "stand-in package (PyAV " + ("hidden" if simulate_bare_host else "not installed") + ")"
    if simulate_bare_host:
        hide = os.path.join(folder, "hidden")
        os.makedirs(hide, exist_ok=True)
        for name in HIDDEN_ON_BARE_HOST:
            with open(os.path.join(hide, name + ".py"), "w", encoding="utf-8") as f:
                f.write(f"raise ModuleNotFoundError('{name} hidden by server_bench --simulate-bare-host', "
                        f"name='{name}')\n")
            notes[name] = "hidden"
        paths.append(hide)
    return paths, notes


@dataclass
class BenchServer(ComfyServer):
    """devtools.comfy_server's server and client, started for the benchmark: on the GPU (no --cpu) unless tiny, no
    latent previews (ComfyUI's default), no API nodes (cloud services), an empty folder as the frontend, the host
    shims on PYTHONPATH and its own Inductor cache folder. Prompts, websocket and /history are ComfyServer's."""

    comfy: str = ""
    cpu: bool = True
    shim_paths: list[str] = field(default_factory=list)
    models_root: str = ""  # the shared models tree (written once, read by every server)

    @property
    def models_dir(self) -> str:
        return self.models_root or super().models_dir

    def start(self, timeout: float = 300.0) -> None:
        for sub in ("input", "output", "temp", "user", "web", "inductor_cache"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        with open(os.path.join(self.root, "web", "index.html"), "w", encoding="utf-8") as f:
            f.write("<!doctype html><title>server_bench</title><p>No frontend: this server answers the API only.\n")
        config = self.write_model_paths("server_bench", ("diffusion_models", "text_encoders", "vae", "loras"))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(self.shim_paths + [p for p in [env.get("PYTHONPATH", "")] if p])
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self.root, "inductor_cache")
        env["TRITON_CACHE_DIR"] = os.path.join(self.root, "inductor_cache", "triton")
        env["PYTHONUNBUFFERED"] = "1"
        self.launch([sys.executable, *self.main_args(config), "--preview-method", "none", "--disable-api-nodes",
                     "--front-end-root", os.path.join(self.root, "web")] + (["--cpu"] if self.cpu else []),
                    self.comfy, timeout, env)


def link_pack(comfy: str) -> str:
    """The pack in the host's custom_nodes as `fluxworks` (a symlink to this checkout), made if missing."""
    link = os.path.join(comfy, "custom_nodes", "fluxworks")
    if not os.path.lexists(link):
        os.symlink(REPO, link)
    if os.path.realpath(link) != os.path.realpath(REPO):
        raise SystemExit(f"{link} points at {os.path.realpath(link)}, not this checkout {REPO}")
    return link


# --- graphs (API format) ----------------------------------------------------------------------------------------------

PROMPTS = ("a lighthouse on a rocky coast at dusk, waves, warm light in the windows",
           "a red fox sitting in fresh snow under pine trees, soft morning light")
SAMPLER, ENCODE, DECODE = "sampler", "encode", "decode"


def node_defaults(info: dict) -> dict:
    """The widget values a freshly added node has, from the server's /object_info entry for it: each input's
    `default`, else a combo's first choice (V1 combos are lists, V3 ones "COMBO" with "options")."""
    out = {}
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    for name, entry in inputs.items():
        kind, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        if kind not in ("BOOLEAN", "INT", "FLOAT", "STRING", "COMBO") and choices is None:
            continue  # a socket (MODEL, FLUX_MODEL, ...)
        if "default" in options:
            out[name] = options["default"]
        elif choices:
            out[name] = choices[0]
    return out


@dataclass(frozen=True)
class GraphParams:
    names: dict[str, str]  # role -> file name
    res: int
    steps: int
    guidance: float
    defaults: dict[str, dict]  # class_type -> node_defaults
    t5_length: str | None = None  # FluxWorksTextEncode max_sequence_length (None: the node's default)


def node(params: GraphParams, class_type: str, **inputs) -> dict:
    """A node with every widget the server lists for it: its defaults, then `inputs`."""
    return {"class_type": class_type, "inputs": {**params.defaults.get(class_type, {}), **inputs}}


def shared_tail(p: GraphParams, sampler: str, prefix: str) -> dict:
    return {
        "latent": node(p, "EmptySD3LatentImage", width=p.res, height=p.res, batch_size=1),
        "vae": node(p, "VAELoader", vae_name=p.names["vae"]),
        DECODE: node(p, "VAEDecode", samples=[sampler, 0], vae=["vae", 0]),
        "save": node(p, "SaveImage", images=[DECODE, 0], filename_prefix=prefix),
    }


def fluxworks_text(p: GraphParams, text: str) -> dict:
    return {
        "text_encoder": node(p, "FluxWorksTextEncoderLoader", t5_name=p.names["t5"], clip_name=p.names["clip_l"]),
        ENCODE: node(p, "FluxWorksTextEncode", text_encoder=["text_encoder", 0], prompt=text, clip_prompt="",
                     **({"max_sequence_length": p.t5_length} if p.t5_length else {})),
    }


def fluxworks_graph(p: GraphParams, model: str, seed: int, text: str, lora: bool) -> dict:
    graph = {"model": node(p, "FluxWorksModelLoader", model_name=p.names[model]), **fluxworks_text(p, text)}
    flux_model = ["model", 0]
    if lora:
        rows = json.dumps([{"lora": p.names["lora"], "strength": 1.0, "enabled": True}])
        graph["lora_stack"] = node(p, "FluxWorksLoraStack", rows=rows)
        graph["apply_lora"] = node(p, "FluxWorksApplyLoraStack", flux_model=flux_model, lora_stack=["lora_stack", 0])
        flux_model = ["apply_lora", 0]
    graph["speed"] = node(p, "FluxWorksSpeed", model=flux_model)
    graph[SAMPLER] = node(p, "FluxWorksSampler", model=["speed", 0], positive=[ENCODE, 0], latent_image=["latent", 0],
                          seed=seed, steps=p.steps, guidance=p.guidance, shift=0.0, denoise=1.0)
    graph.update(shared_tail(p, SAMPLER, f"server_bench_{model}_fluxworks"))
    return graph


def core_graph(p: GraphParams, seed: int, text: str, lora: bool, core_text: bool, compile: bool) -> dict:
    graph = {"unet": node(p, "UNETLoader", unet_name=p.names["dev"], weight_dtype="fp8_e4m3fn_fast")}
    model = ["unet", 0]
    if lora:
        graph["lora"] = node(p, "LoraLoaderModelOnly", model=model, lora_name=p.names["lora"], strength_model=1.0)
        model = ["lora", 0]
    if compile:
        graph["compile"] = node(p, "TorchCompileModel", model=model, backend="inductor")
        model = ["compile", 0]
    if core_text:
        graph["clip"] = node(p, "DualCLIPLoader", clip_name1=p.names["clip_l"], clip_name2=p.names["t5"], type="flux")
        graph[ENCODE] = node(p, "CLIPTextEncode", clip=["clip", 0], text=text)
    else:
        graph.update(fluxworks_text(p, text))
    graph["guidance"] = node(p, "FluxGuidance", conditioning=[ENCODE, 0], guidance=p.guidance)
    graph["negative"] = node(p, "ConditioningZeroOut", conditioning=[ENCODE, 0])
    graph[SAMPLER] = node(p, "KSampler", model=model, seed=seed, steps=p.steps, cfg=1.0, sampler_name="euler",
                          scheduler="simple", positive=["guidance", 0], negative=["negative", 0],
                          latent_image=["latent", 0], denoise=1.0)
    graph.update(shared_tail(p, SAMPLER, "server_bench_dev_core"))
    return graph


NODE_TYPES = ("FluxWorksModelLoader", "FluxWorksTextEncoderLoader", "FluxWorksTextEncode", "FluxWorksLoraStack",
              "FluxWorksApplyLoraStack", "FluxWorksSpeed", "FluxWorksSampler", "UNETLoader", "LoraLoaderModelOnly",
              "TorchCompileModel", "DualCLIPLoader", "CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut", "KSampler",
              "EmptySD3LatentImage", "VAELoader", "VAEDecode", "SaveImage")


# --- timing from the server's messages ---------------------------------------------------------------------------------

def prompt_timings(timed: list[tuple[float, dict]], graph: dict, sampler: str = SAMPLER) -> dict:
    """What one prompt's websocket messages say. `timed`: (receive time.time(), message) in order.

    image_s: execution_start -> execution_success by the server's own timestamps (ms). nodes_s: each executed
    node, from its `executing` message to the next one (or to execution_success). ms_per_step: the sampler's
    progress messages, first -> last, over the steps between them (so step 1, with any compiling, is left out);
    first_step_s: the sampler's start to its first progress message."""
    out: dict = {"status": "no execution_success"}
    stamps = {m["type"]: m["data"].get("timestamp") for _, m in timed if m["type"].startswith("execution_")}
    cached = [m["data"].get("nodes", []) for _, m in timed if m["type"] == "execution_cached"]
    out["cached_nodes"] = sorted(cached[0]) if cached else []
    if "execution_error" in stamps:
        error = next(m["data"] for _, m in timed if m["type"] == "execution_error")
        out["status"] = "error"
        out["error"] = f"{error.get('node_type')}: {error.get('exception_type')}: {error.get('exception_message')}"[:800]
    elif "execution_interrupted" in stamps:
        out["status"] = "interrupted"
    elif stamps.get("execution_success") is not None and stamps.get("execution_start") is not None:
        out["status"] = "success"
        out["image_s"] = round((stamps["execution_success"] - stamps["execution_start"]) / 1000, 3)
    starts = [(t, m["data"]["node"]) for t, m in timed if m["type"] == "executing" and m["data"].get("node")]
    end = next((t for t, m in timed if m["type"] in ("execution_success", "execution_error", "execution_interrupted")),
               None)
    nodes = {}
    for i, (t, node_id) in enumerate(starts):
        following = starts[i + 1][0] if i + 1 < len(starts) else end
        if following is not None:
            nodes[node_id] = round(nodes.get(node_id, 0.0) + following - t, 3)
    out["nodes_s"] = {k: {"class_type": graph.get(k, {}).get("class_type", "?"), "s": v} for k, v in nodes.items()}
    progress = [(t, m["data"]) for t, m in timed if m["type"] == "progress" and m["data"].get("node") == sampler]
    out["steps_seen"] = len(progress)
    if progress:
        sampler_start = next((t for t, n in starts if n == sampler), None)
        if sampler_start is not None:
            out["first_step_s"] = round(progress[0][0] - sampler_start, 3)
        out["steps_total"] = progress[-1][1].get("max")
    if len(progress) >= 2:
        span = progress[-1][0] - progress[0][0]
        steps = progress[-1][1]["value"] - progress[0][1]["value"]
        if steps > 0:
            out["ms_per_step"] = round(span / steps * 1000, 2)
    return out


# --- the run ----------------------------------------------------------------------------------------------------------

# Rough H200 costs (s) at 1024^2 / 28 steps, only for the time budget: server start, then each prompt.
EXPECTED_S = {"start": 30, ("fluxworks", "cold"): 100, ("fluxworks", "warm"): 10, ("fluxworks", "lora"): 30,
              ("core", "cold"): 190, ("core", "warm"): 10, ("core", "lora"): 150,
              ("schnell", "cold"): 80, ("schnell", "warm"): 5, "schnell_file": 60}
GRAPHS = ("fluxworks", "core", "schnell")


@dataclass
class PromptPlan:
    name: str  # cold / warm / lora
    seed: int
    text: str
    lora: bool


def plans(graph: str, seed: int) -> list[PromptPlan]:
    if graph == "schnell":
        return [PromptPlan("cold", seed, PROMPTS[0], False), PromptPlan("warm", seed + 1, PROMPTS[1], False)]
    return [PromptPlan("cold", seed, PROMPTS[0], False), PromptPlan("warm", seed + 1, PROMPTS[0], False),
            PromptPlan("lora", seed + 2, PROMPTS[0], True)]


class ServerBench:
    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args, self.started = args, started
        self.cpu = args.tiny
        self.device = "cpu" if self.cpu else "cuda"
        self.budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 540.0)
        self.work = tempfile.mkdtemp(prefix="server_bench_")
        self.models_dir = args.models_dir or os.path.join(self.work, "models")
        self.report: dict = {
            "bench": "bench/server_bench.py", "mode": "tiny (CPU)" if args.tiny else "full",
            "device": "cpu" if self.cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
            "comfyui": comfy_version(args.comfy), "date": time.strftime("%Y-%m-%d"), "budget_s": self.budget,
            "settings": {"res": args.res, "steps": args.steps, "schnell_steps": args.schnell_steps,
                         "guidance": args.guidance, "seed": args.seed, "prompts": list(PROMPTS), "batch": 1,
                         "fluxworks_t5_length": args.t5_length or "node default",
                         "core_text": ("FluxWorks' text nodes (--tiny: core's DualCLIPLoader builds a full-size "
                                       "T5-XXL)" if args.tiny else "DualCLIPLoader(type=flux) + CLIPTextEncode: "
                                       "core's Flux tokenizer pads T5 to at least 256 tokens"),
                         "latent_previews": "none (--preview-method none, ComfyUI's default)",
                         "cold": "a fresh server per graph, empty Inductor and Triton caches (TORCHINDUCTOR_CACHE_DIR, "
                                 "TRITON_CACHE_DIR), weight files in the page cache (just written)",
                         "timing": "image_s from the server's execution_start/execution_success timestamps; nodes_s "
                                   "and ms_per_step from the receive times of executing/progress messages"},
            "files": {}, "host": {}, "graphs": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, expected: float) -> str | None:
        if self.budget is None or self.elapsed() + expected <= self.budget:
            return None
        return f"time budget: {self.elapsed():.0f} s used + ~{expected:.0f} s expected > {self.budget:.0f} s"

    def emit(self, final: bool = False) -> None:
        path = os.path.join(self.args.out, "server_bench.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.report, f, indent=1)
        if final:
            print(json.dumps(self.report), flush=True)  # noqa: T201 - a benchmark script reports on stdout

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.0f} s] {text}", flush=True)  # noqa: T201

    # files
    def write_files(self, files: list[ModelFile]) -> None:
        device = self.device
        need = sum(file_size(f.specs) for f in files
                   if not already_written(os.path.join(self.models_dir, f.folder, f.name), f.specs))
        os.makedirs(self.models_dir, exist_ok=True)
        free = shutil.disk_usage(self.models_dir).free
        if need > free - (1 << 30):
            raise SystemExit(f"server_bench: the files need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                             f"in {self.models_dir}")
        for f in files:
            path = os.path.join(self.models_dir, f.folder, f.name)
            entry = {"name": f.name, "params": f.params, "bytes": file_size(f.specs),
                     "dtype": sorted({SAFETENSORS_DTYPES[s.dtype] for s in f.specs})}
            t = time.perf_counter()
            if already_written(path, f.specs):
                entry["reused"] = True
            else:
                generator = torch.Generator(device).manual_seed(f.seed)
                write_safetensors(path, f.specs, lambda spec, g=generator: random_tensor(spec, g, device))
                entry["write_s"] = round(time.perf_counter() - t, 1)
            self.report["files"][f.role] = entry
            if device == "cuda":
                torch.cuda.empty_cache()  # the servers, not this process, should hold the GPU's memory
            self.say(f"{f.role}: {f.name} ({f.params / 1e9:.3f} B parameters, {entry['bytes'] / 2**30:.2f} GiB) "
                     + ("reused" if entry.get("reused") else f"written in {entry['write_s']} s"))
        self.emit()

    # one graph on its own server
    def run_graph(self, graph: str, names: dict[str, str]) -> None:
        entry: dict = {"graph": graph, "prompts": []}
        self.report["graphs"].append(entry)
        expected = EXPECTED_S["start"] + EXPECTED_S[(graph, "cold")]
        why = self.fits(expected)
        if why:
            entry["skipped"] = why
            self.say(f"{graph}: skipped ({why})")
            self.emit()
            return
        root = tempfile.mkdtemp(prefix=f"{graph}_", dir=self.work)
        server = BenchServer(root, port=free_port(), comfy=self.args.comfy, cpu=self.cpu,
                             shim_paths=self.shim_paths, models_root=self.models_dir)
        try:
            t = time.perf_counter()
            server.start(timeout=300.0 if self.budget is None else max(60.0, self.budget - self.elapsed()))
            entry["server_start_s"] = round(time.perf_counter() - t, 1)
            info = server.get_json("/object_info")
            missing = [n for n in NODE_TYPES if n not in info]
            if missing:
                raise RuntimeError(f"the server has no {missing} (import failures in its log?)")
            params = GraphParams(names, self.args.res, self.args.schnell_steps if graph == "schnell" else
                                 self.args.steps, self.args.guidance, {n: node_defaults(info[n]) for n in NODE_TYPES},
                                 self.args.t5_length)
            entry["steps"] = params.steps
            for plan in plans(graph, self.args.seed):
                expected = EXPECTED_S[(graph, plan.name)] if not self.cpu else 0
                why = self.fits(expected)
                if why:
                    entry["prompts"].append({"name": plan.name, "skipped": why})
                    self.say(f"{graph} {plan.name}: skipped ({why})")
                    break
                if graph == "core":
                    prompt = core_graph(params, plan.seed, plan.text, plan.lora, core_text=not self.args.tiny,
                                        compile=not self.args.no_core_compile)
                else:
                    prompt = fluxworks_graph(params, "schnell" if graph == "schnell" else "dev", plan.seed,
                                             plan.text, plan.lora)
                row = self.run_prompt(server, plan, prompt)
                entry["prompts"].append(row)
                self.emit()
                if row["status"] != "success":
                    break
        except Exception as exc:  # noqa: BLE001 - a failed graph is reported; the other graphs still run
            entry["error"] = repr(exc)[:2000]
            self.say(f"{graph}: failed: {exc!r}"[:2000])
        finally:
            server.stop()
            if server.log_path and os.path.exists(server.log_path):
                shutil.copy(server.log_path, os.path.join(self.args.out, f"server_bench_{graph}.log"))
                lines = server.log().splitlines()
                entry["log_warnings"] = [line for line in lines if "Missing VAE keys" in line or "Leftover VAE keys"
                                         in line or "lora key not loaded" in line][:20]
                entry["import_failed"] = [line.split("IMPORT FAILED:")[-1].strip() for line in lines
                                          if "IMPORT FAILED" in line]
            self.emit()

    def run_prompt(self, server: BenchServer, plan: PromptPlan, prompt: dict) -> dict:
        row: dict = {"name": plan.name, "seed": plan.seed, "text": plan.text, "lora": plan.lora}
        timed: list[tuple[float, dict]] = []
        timeout = 3600.0 if self.budget is None else max(10.0, self.budget - self.elapsed())
        t = time.perf_counter()
        try:
            result: PromptResult = server.run(prompt, timeout=timeout,
                                              on_message=lambda _s, m: timed.append((time.time(), m)))
        except (TimeoutError, websocket.WebSocketTimeoutException):  # no message for the rest of the budget
            server.interrupt()
            row.update(status="cut off", note=f"still running after {timeout:.0f} s: interrupted at the time budget")
            self.say(f"{plan.name}: cut off by the time budget")
            return row
        row["client_s"] = round(time.perf_counter() - t, 3)
        row.update(prompt_timings(timed, prompt))
        row["prompt_id"] = result.prompt_id
        row["images"] = sum(len(out.get("images", [])) for out in result.outputs.values())
        row["prompt_graph"] = prompt
        self.say(f"{plan.name}: {row['status']}, image {row.get('image_s', '—')} s, "
                 f"{row.get('ms_per_step', '—')} ms/step ({row['steps_seen']} steps seen)"
                 + (f": {row['error']}" if "error" in row else ""))
        return row

    def run(self) -> bool:
        """Write the files, run every graph, print the table; False when a graph or a prompt failed with an error.
        The work folder (tens of GiB at full size) is removed however the run ends, unless --keep."""
        try:
            return self._run()
        finally:
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> bool:
        os.makedirs(self.args.out, exist_ok=True)
        graphs = [g for g in GRAPHS if g in self.args.graphs]
        roles = set()
        if {"fluxworks", "core"} & set(graphs):
            roles |= {"dev", "t5", "clip_l", "vae", "lora"}
        if "schnell" in graphs:
            roles |= {"t5", "clip_l", "vae"}
        files = model_files(self.args.tiny, {"dev", "t5", "clip_l", "vae", "lora", "schnell"})
        by_role = {f.role: f for f in files}
        names = {f.role: f.name for f in files}
        self.write_files([f for f in files if f.role in roles])
        env = dict(os.environ)
        self.shim_paths, self.report["host"] = host_shims(os.path.join(self.work, "shims"), env,
                                                          self.args.simulate_bare_host)
        self.report["host"]["frontend"] = "none: --front-end-root on an empty folder"
        self.report["host"]["pack"] = link_pack(self.args.comfy)
        for graph in graphs:
            if graph == "schnell":
                if not self.prepare_schnell(by_role):
                    continue
            self.run_graph(graph, names)
        self.report["total_s"] = round(self.elapsed(), 1)
        self.emit(final=True)
        print(markdown_table(self.report), flush=True)  # noqa: T201
        # A prompt cut off or skipped by the time budget is reported, not failed.
        return not any(g.get("error") or any(p.get("status") == "error" for p in g.get("prompts", []))
                       for g in self.report["graphs"])

    def prepare_schnell(self, by_role: dict[str, ModelFile]) -> bool:
        """Write the schnell transformer (skipped when the budget has no room for it and its prompts). With too
        little disk for both transformers, the dev file (no longer needed: its graphs ran) is deleted first."""
        schnell = by_role["schnell"]
        path = os.path.join(self.models_dir, schnell.folder, schnell.name)
        cost = 0 if self.cpu or already_written(path, schnell.specs) else EXPECTED_S["schnell_file"]
        why = self.fits(cost + EXPECTED_S["start"] + EXPECTED_S[("schnell", "cold")])
        if why:
            self.report["graphs"].append({"graph": "schnell", "prompts": [], "skipped": why})
            self.say(f"schnell: skipped ({why})")
            self.emit()
            return False
        dev = os.path.join(self.models_dir, by_role["dev"].folder, by_role["dev"].name)
        if not already_written(path, schnell.specs) and os.path.exists(dev) and \
                shutil.disk_usage(self.models_dir).free < file_size(schnell.specs) + (2 << 30):
            os.remove(dev)
            self.report["files"].setdefault("dev", {"name": by_role["dev"].name})["deleted_for_disk_space"] = True
        self.write_files([schnell])
        return True


def comfy_version(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "comfyui_version.py"), encoding="utf-8") as f:
            return f.read().split('"')[1]
    except (OSError, IndexError):
        return None


# --- the table ---------------------------------------------------------------------------------------------------------

def graph_settings(graph: dict) -> str:
    """The nodes that make the graph's speed, with their widget values, from its cold prompt."""
    prompts = [p for p in graph.get("prompts", []) if "prompt_graph" in p]
    if not prompts:
        return ""
    keep = ("UNETLoader", "TorchCompileModel", "FluxWorksSpeed", "FluxWorksSampler", "KSampler", "FluxGuidance",
            "FluxWorksTextEncode", "DualCLIPLoader")
    parts = []
    for values in prompts[0]["prompt_graph"].values():
        if values["class_type"] in keep:
            widgets = {k: v for k, v in values["inputs"].items() if not isinstance(v, list) and k not in
                       ("prompt", "text", "seed", "unet_name", "model_name", "clip_name1", "clip_name2")}
            parts.append(values["class_type"] + "(" + ", ".join(f"{k}={v}" for k, v in widgets.items()) + ")")
    return " + ".join(parts)


def markdown_table(report: dict) -> str:
    def cell(row: dict | None, key: str = "image_s") -> str:
        if row is None:
            return "—"
        if row.get("status") == "success":
            return f"{row[key]:.2f}" if row.get(key) is not None else "—"
        return row.get("skipped") or row.get("status", "?") + (": " + row["error"][:80] if row.get("error") else "")

    def node_s(row: dict | None, class_types: tuple[str, ...]) -> str:
        if not row or row.get("status") != "success":
            return "—"
        seconds = [v["s"] for v in row.get("nodes_s", {}).values() if v["class_type"] in class_types]
        return f"{sum(seconds):.2f}" if seconds else "cached"

    settings = report["settings"]
    lines = [f"{report['mode']}, {report['device']}, ComfyUI {report.get('comfyui')}, {settings['res']}x"
             f"{settings['res']}, dev {settings['steps']} steps / schnell {settings['schnell_steps']} steps, guidance "
             f"{settings['guidance']}, seeds from {settings['seed']}; image s = the server's execution_start -> "
             "execution_success", "",
             "| graph | cold s | warm s | warm after LoRA change s | ms/step cold / warm / LoRA | warm: text encode s "
             "| warm: sampler s | warm: VAE decode s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for graph in report["graphs"]:
        rows = {p["name"]: p for p in graph.get("prompts", [])}
        if graph.get("skipped") or graph.get("error") and not rows:
            lines.append(f"| {graph['graph']} | {graph.get('skipped') or 'failed: ' + graph['error'][:120]} "
                         "| | | | | | |")
            continue
        ms = " / ".join(cell(rows.get(n), "ms_per_step") if rows.get(n, {}).get("status") == "success" else "—"
                        for n in ("cold", "warm", "lora"))
        warm = rows.get("warm")
        lora = "n/a" if graph["graph"] == "schnell" else cell(rows.get("lora"))
        lines.append(f"| {graph['graph']} | {cell(rows.get('cold'))} | {cell(warm)} | {lora} | {ms} "
                     f"| {node_s(warm, ('FluxWorksTextEncode', 'CLIPTextEncode'))} "
                     f"| {node_s(warm, ('FluxWorksSampler', 'KSampler'))} | {node_s(warm, ('VAEDecode',))} |")
    lines.append("")
    for graph in report["graphs"]:
        text = graph_settings(graph)
        if text:
            lines.append(f"- {graph['graph']}: {text}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small files of the same formats on the CPU, 64x64, 2 steps")
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated: " + ", ".join(GRAPHS))
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28, help="dev steps (fluxworks and core graphs)")
    ap.add_argument("--schnell-steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=42, help="cold prompt's seed; warm +1, after the LoRA change +2")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip prompts that would end after this many seconds (default 540 on a GPU, none in --tiny)")
    ap.add_argument("--comfy", default=comfyui_path(), help="the ComfyUI folder whose main.py runs the server")
    ap.add_argument("--models-dir", default=None,
                    help="where the random files go (default: a temporary folder); complete files there are reused")
    ap.add_argument("--t5-length", default=None, choices=("512", "256", "128"),
                    help="FluxWorksTextEncode max_sequence_length (default: the node's default; 128 in --tiny, where "
                         "the text tokens would make most of the 3072-wide model's work)")
    ap.add_argument("--no-core-compile", action="store_true", help="leave TorchCompileModel out of the core graph")
    ap.add_argument("--simulate-bare-host", action="store_true",
                    help="hide the packages the GPU machine lacks and use the PyAV stand-in (a check of that trick)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (servers' trees, files)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    args.graphs = {g.strip() for g in args.graphs.split(",") if g.strip()}
    if args.graphs - set(GRAPHS):
        ap.error(f"--graphs: unknown {sorted(args.graphs - set(GRAPHS))}; choose from {', '.join(GRAPHS)}")
    if args.tiny:
        args.res, args.steps, args.schnell_steps = min(args.res, 64), min(args.steps, 2), min(args.schnell_steps, 2)
        args.t5_length = args.t5_length or "128"
    elif not torch.cuda.is_available():
        ap.error("the full-size run needs a CUDA GPU; use --tiny on the CPU")
    if args.res % 16 or min(args.steps, args.schnell_steps) < 2:
        ap.error("--res must be a multiple of 16 and the step counts at least 2 (ms/step needs two progress messages)")
    args.comfy = os.path.abspath(args.comfy)
    if not os.path.isfile(os.path.join(args.comfy, "main.py")):
        ap.error(f"--comfy {args.comfy} has no main.py")
    return args


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    if not ServerBench(args, started).run():
        raise SystemExit("server_bench: a graph or prompt failed (see the report's error and status fields)")


if __name__ == "__main__":
    main()
