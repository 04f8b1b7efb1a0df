"""A real ComfyUI server for end-to-end tests, and a small HTTP + websocket client for it.

The server runs the host's own `main.py` on 127.0.0.1 with the pack linked into custom_nodes, reads models
from a temporary models tree (extra_model_paths.yaml) and writes into temporary folders.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

import requests
import safetensors.torch
import torch
import websocket
from PIL import Image

from devtools.paths import PYTHON, comfyui_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PromptResult:
    prompt_id: str
    messages: list[dict]  # websocket JSON messages for this prompt, in order
    outputs: dict  # /history outputs
    status: str  # "success", "error" or "interrupted"

    def error(self) -> dict:
        for m in self.messages:
            if m["type"] == "execution_error":
                return m["data"]
        raise AssertionError(f"prompt {self.prompt_id} had no execution_error: status {self.status}")

    def progress(self, node: str) -> list[int]:
        """The `value` of every websocket progress message `node` sent, in order."""
        return [m["data"]["value"] for m in self.messages
                if m["type"] == "progress" and m["data"].get("node") == node]


def remove_trained_files(outputs: dict, node_ids) -> None:
    """Delete what the FluxWorks Train LoRA nodes `node_ids` wrote (the LoRA and its training state, listed in their
    "lora_files" UI output). They land in ComfyUI's own models/loras (the first loras folder), not in a server's
    temporary root, so whoever ran the training removes them."""
    for node_id in node_ids:
        for file in outputs.get(str(node_id), {}).get("lora_files", []):
            if os.path.isfile(file):
                os.remove(file)


@dataclass
class ComfyServer:
    root: str  # temporary folder holding models/, input/, output/, temp/, user/
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: str = ""
    model_names: dict[str, str] = field(default_factory=dict)  # role -> name, from write_models_tree

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> str:
        return os.path.join(self.root, "models")

    @property
    def output_dir(self) -> str:
        return os.path.join(self.root, "output")

    @property
    def input_dir(self) -> str:
        return os.path.join(self.root, "input")

    def start(self, timeout: float = 180.0) -> None:
        for sub in ("models", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        config = self.write_model_paths("fluxworks_tests", ("diffusion_models", "text_encoders", "vae", "loras",
                                                            "controlnet", "checkpoints"))
        self.launch([PYTHON, *self.main_args(config), "--cpu", "--preview-method", "latent2rgb"], comfyui_path(),
                    timeout)

    def write_model_paths(self, section: str, folders: tuple[str, ...]) -> str:
        """An extra_model_paths.yaml in `root` that adds `folders` of `models_dir` to ComfyUI's lists; its path."""
        config = os.path.join(self.root, "extra_model_paths.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(f"{section}:\n    base_path: " + self.models_dir + "\n")
            for name in folders:
                f.write(f"    {name}: {name}\n")
        return config

    def main_args(self, model_paths: str) -> list[str]:
        """ComfyUI's main.py and the arguments every server here shares: this port on localhost, the model paths
        file, and `root`'s folders for input, output, temp and user data; an in-memory database."""
        return ["main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--extra-model-paths-config",
                model_paths, "--disable-auto-launch", "--output-directory", self.output_dir, "--input-directory",
                self.input_dir, "--temp-directory", os.path.join(self.root, "temp"), "--user-directory",
                os.path.join(self.root, "user"), "--database-url", "sqlite:///:memory:"]

    def launch(self, cmd: list[str], cwd: str, timeout: float, env: dict | None = None) -> None:
        """Start `cmd` in `cwd` (log in root/server.log) and wait until it answers /system_stats; a server that
        exits or does not answer within `timeout` s raises with the end of its log (and is stopped)."""
        self.log_path = os.path.join(self.root, "server.log")
        log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats")
                return
            except OSError:  # not listening yet (urllib's URLError is an OSError)
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    # --- HTTP -------------------------------------------------------------------------------------
    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def upload_image(self, image: Image.Image, name: str) -> str:
        """Upload a PNG through /upload/image (as the web UI's LoadImage does); returns its input name."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        response = requests.post(f"{self.url}/upload/image", files={"image": (name, buffer.getvalue(), "image/png")},
                                 data={"overwrite": "true"}, timeout=30)
        response.raise_for_status()
        return response.json()["name"]

    def view(self, file: dict) -> bytes:
        """The bytes of an output/input/temp file ({filename, subfolder, type}) from /view."""
        query = urllib.parse.urlencode({k: file[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as r:
            return r.read()

    def view_image(self, image: dict) -> Image.Image:
        return Image.open(io.BytesIO(self.view(image))).copy()

    # --- prompts ----------------------------------------------------------------------------------
    def queue(self, prompt: dict, client_id: str, extra_data: dict | None = None) -> str:
        """`extra_data` as the frontend sends it, e.g. {"extra_pnginfo": {"workflow": ...}} for SaveImage."""
        request = {"prompt": prompt, "client_id": client_id, **({"extra_data": extra_data} if extra_data else {})}
        status, body = self.post_json("/prompt", request)
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def run(self, prompt: dict, timeout: float = 300.0, on_message=None, extra_data: dict | None = None) -> PromptResult:
        """Queue `prompt`, follow the websocket until it finishes, return messages and /history outputs.

        `on_message(server, message)` is called for each JSON message of this prompt (e.g. to interrupt).
        """
        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)
        try:
            prompt_id = self.queue(prompt, client_id, extra_data)
            messages: list[dict] = []
            status = ""
            deadline = time.monotonic() + timeout
            while not status:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")
                raw = ws.recv()
                if isinstance(raw, bytes):  # binary preview frames
                    messages.append({"type": "binary_preview", "data": {"size": len(raw)}})
                    continue
                msg = json.loads(raw)
                if msg.get("data", {}).get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(msg)
                if on_message is not None:
                    on_message(self, msg)
                kind = msg["type"]
                if kind == "execution_success":
                    status = "success"
                elif kind == "execution_error":
                    status = "error"
                elif kind == "execution_interrupted":
                    status = "interrupted"
        finally:
            ws.close()
        history = {}
        for _ in range(50):  # history is written right after the last message
            history = self.get_json(f"/history/{prompt_id}").get(prompt_id, {})
            if history:
                break
            time.sleep(0.1)
        return PromptResult(prompt_id, messages, history.get("outputs", {}), status)

    def images(self, result: PromptResult) -> list[Image.Image]:
        return [self.view_image(img) for out in result.outputs.values() for img in out.get("images", [])]

    def latent(self, result: PromptResult, node: str) -> torch.Tensor:
        """The (B, C, H, W) tensor that the core SaveLatent node `node` wrote."""
        [file] = result.outputs[node]["latents"]
        return safetensors.torch.load(self.view(file))["latent_tensor"]


class PromptRejected(Exception):
    """POST /prompt answered with an error (validation failed before execution)."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body
