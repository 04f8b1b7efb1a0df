"""Test-side access to the development paths (kept so tests import one place)."""

from devtools.paths import PYTHON, REPO, comfyui_path, tokenizer_folders

__all__ = ["PYTHON", "REPO", "comfyui_path", "tokenizer_folders"]
