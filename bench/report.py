"""What the GPU benchmark scripts share: one JSON line on stdout per finished measurement (the tail of a
device command's output), the same results rewritten to a file (so a run cut off keeps its part), a device sync
before reading a timer, and the check that the ComfyUI on PYTHONPATH is the one named on the command line.

Importing this module imports the package `fluxworks`, which imports ComfyUI when it is importable: a script sets
up ComfyUI's argument parsing (`comfy.options.enable_args_parsing()`) before importing it."""

from __future__ import annotations

import importlib.util
import json
import os

import torch


def write_report(results: dict, path: str, echo: bool = True) -> None:
    """Rewrite `path` with `results`; with `echo`, also print them as one JSON line."""
    if echo:
        print(json.dumps(results), flush=True)  # noqa: T201 - a benchmark script reports on stdout
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_comfy(folder: str) -> None:
    """Fail early, naming the fix, when the ComfyUI on sys.path is not `folder`, or when `import nodes` does not
    find core's nodes.py (the repository root ahead of ComfyUI on sys.path: its nodes/ package hides core's module,
    and core's own extras import it)."""
    spec = importlib.util.find_spec("comfy")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit(f"ComfyUI is not importable: put its folder on PYTHONPATH (PYTHONPATH={folder})")
    found = os.path.dirname(os.path.realpath(list(spec.submodule_search_locations)[0]))
    if found != os.path.realpath(folder):
        raise SystemExit(f"--comfy is {folder}, but the ComfyUI on PYTHONPATH is {found}: pass --comfy {found} or put "
                         f"{folder} on PYTHONPATH")
    nodes = importlib.util.find_spec("nodes")
    if nodes is None or nodes.origin is None or os.path.dirname(os.path.realpath(nodes.origin)) != found:
        where = nodes.origin if nodes is not None else "nothing"
        raise SystemExit(f"`import nodes` finds {where}, not ComfyUI's nodes.py in {found}: the repository root is on "
                         "sys.path ahead of ComfyUI. Run the script by its path, with only ComfyUI and the folder "
                         "holding the fluxworks link on PYTHONPATH")
