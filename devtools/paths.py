"""Where the development ComfyUI host lives (COMFYUI_PATH, else the repo's .comfyui)."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def comfyui_path() -> str:
    return os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".comfyui")


def tokenizer_folders() -> tuple[str, str]:
    comfy = os.path.join(comfyui_path(), "comfy")
    return os.path.join(comfy, "sd1_tokenizer"), os.path.join(comfy, "text_encoders", "t5_tokenizer")
