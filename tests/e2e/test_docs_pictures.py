"""Every picture in docs/ that shows a generated image carries the ComfyUI workflow that made it (the "prompt" and
"workflow" PNG text chunks SaveImage writes), so dropping it on the canvas gives the graph back. Plots and
screenshots of nodes show no generated image; they are listed here by name, so a new picture must be either
made through ComfyUI (devtools/docs_pictures.py) or listed with its reason."""

from __future__ import annotations

import glob
import json
import os

import pytest
from PIL import Image

from tests.paths import REPO

DOCS = os.path.join(REPO, "docs")
NOT_OUTPUTS = {
    "performance_ms_per_step.png": "plot (bench/plot_speed.py)",
    "img/guidance_curve.png": "screenshot of a node (tests/e2e/test_widgets.py)",
    "img/lora_stack.png": "screenshot of a node (tests/e2e/test_widgets.py)",
    "img/regional_grid.png": "comparison sheet (evaluation.regional --grid): target renders drawn by training/shapes.py "
                             "beside three in-process methods, one of them core's mask blend, that no single graph makes",
    "img/regional_prompt.png": "screenshot of a node (tests/e2e/test_regional_widget.py)",
    "img/sampler_with_schedule.png": "screenshot of nodes (tests/e2e/test_widgets.py)",
}


def docs_pictures() -> list[str]:
    return sorted(os.path.relpath(p, DOCS).replace(os.sep, "/")
                  for p in glob.glob(os.path.join(DOCS, "**", "*.png"), recursive=True))


def test_the_exempt_pictures_exist():
    """A stale entry would exempt a future picture of the same name without anyone deciding so."""
    assert set(NOT_OUTPUTS) <= set(docs_pictures())


@pytest.mark.parametrize("name", [p for p in docs_pictures() if p not in NOT_OUTPUTS])
def test_generated_picture_carries_its_workflow(name):
    with Image.open(os.path.join(DOCS, name)) as image:
        chunks = dict(image.text)
    missing = {"prompt", "workflow"} - set(chunks)
    assert not missing, f"docs/{name} has no {sorted(missing)} chunk: make it with devtools/docs_pictures.py"
    prompt, workflow = json.loads(chunks["prompt"]), json.loads(chunks["workflow"])
    assert workflow["version"] == 0.4 and workflow["nodes"]
    # The API prompt is the UI graph's nodes, by id and type.
    assert {k: n["class_type"] for k, n in prompt.items()} == {str(n["id"]): n["type"] for n in workflow["nodes"]}
    assert any(n["class_type"] == "FluxWorksSampler" for n in prompt.values())
