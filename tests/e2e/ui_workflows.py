"""The example workflows in both formats, for the tests. The format rules and the frontend's UI -> API
conversion live in `devtools.workflow_format` (the example writer uses them too) and are re-exported here."""

from __future__ import annotations

import copy
import json
import os
import shutil

from devtools.workflow_format import (
    WIDGET_TYPES,
    input_names,
    input_spec,
    set_values,
    ui_to_api,
    widget_names,
    widget_values,
)
from tests.e2e.workflows import CANONICAL_MODELS
from tests.paths import REPO, comfyui_path

__all__ = ["WIDGET_TYPES", "input_names", "input_spec", "set_values", "ui_to_api", "widget_names", "widget_values"]

EXAMPLES_DIR = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(EXAMPLES_DIR, "api")
# Input images the examples load (LoadImage), shipped in every ComfyUI's input/ folder.
EXAMPLE_INPUT_IMAGES = ("example.png",)


def workflow_names() -> list[str]:
    """Names (file stems) of the UI-format example workflows."""
    return sorted(f[:-5] for f in os.listdir(EXAMPLES_DIR) if f.endswith(".json"))


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_ui(name: str) -> dict:
    return _read_json(os.path.join(EXAMPLES_DIR, name + ".json"))


def load_api(name: str) -> dict:
    return _read_json(os.path.join(API_DIR, name + ".json"))


def copy_example_inputs(input_dir: str) -> None:
    """Put the images the examples load into a server's input folder, as a stock ComfyUI install has them."""
    for name in EXAMPLE_INPUT_IMAGES:
        source = os.path.join(comfyui_path(), "input", name)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source} is missing: the examples load {name}, which ComfyUI ships in input/")
        shutil.copyfile(source, os.path.join(input_dir, name))


def with_model_names(workflow: dict, names: dict[str, str]) -> dict:
    """A copy of a UI- or API-format workflow with the canonical model file names replaced by `names[role]`."""
    mapping = {canonical: names[role] for canonical, role in CANONICAL_MODELS.items()}
    out = copy.deepcopy(workflow)
    if "nodes" in out:
        for node in out["nodes"]:
            node["widgets_values"] = [mapping.get(v, v) if isinstance(v, str) else v
                                      for v in node.get("widgets_values") or []]
    else:
        for node in out.values():
            node["inputs"] = {k: mapping.get(v, v) if isinstance(v, str) else v for k, v in node["inputs"].items()}
    return out


