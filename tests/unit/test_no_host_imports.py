"""The pack's core packages must work without ComfyUI: import every module of each with the host's modules
blocked. Only `nodes/` may touch ComfyUI (through `nodes/host.py`)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

from tests.paths import REPO

CORE_PACKAGES = ("flux_models", "flux_sampler", "flux_speed", "flux_lora", "flux_controlnet", "flux_training",
                 "flux_parallel")

BLOCKER = """
import importlib, sys
HOST = {'comfy', 'comfy_api', 'comfy_extras', 'folder_paths', 'nodes', 'server', 'latent_preview', 'execution'}
class Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split('.')[0]
        if top == 'folder_paths':
            return None  # the pack's __init__ probes for a host with find_spec: answer "no host"
        if top in HOST:
            raise ImportError('host module imported: ' + name)
sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
assert 'folder_paths' not in sys.modules
print('ok')
"""


def core_modules() -> list[str]:
    names = []
    for package in CORE_PACKAGES:
        names.append(f"fluxworks.{package}")
        names += [f"fluxworks.{package}.{m.name}" for m in pkgutil.iter_modules([str(Path(REPO) / package)])]
    return names


def test_core_packages_import_without_comfyui():
    modules = core_modules()
    assert len(modules) > 30  # every module of every core package, not a sample
    out = subprocess.run([sys.executable, "-c", BLOCKER, *modules], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
