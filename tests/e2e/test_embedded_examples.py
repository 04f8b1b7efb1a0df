"""The embedded-model examples (example_workflows/embedded_*) on a ComfyUI that has no model files besides the
pack's embedded ones: each API copy is queued exactly as shipped and must draw what its caption (or its control
image) asks for; the LoRA, the ControlNet and the LoRA the training example trains must each change the picture
the way they were trained to."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from devtools.comfy_server import remove_trained_files
from devtools.embedded_examples import (
    EMBEDDED_CONTROLNET,
    EMBEDDED_FILES,
    PREFIX,
    SIZE,
    TWINS,
    build_twin,
    training_nodes,
)
from evaluation.adherence import analyse, colour_share
from tests.e2e.ui_workflows import load_api, load_ui, ui_to_api, workflow_names

pytestmark = pytest.mark.e2e

# Real-weight examples without a twin, and why (none: core_model_scheduled_guidance's twin loads the embedded model
# with FluxWorks Load Core Model, since core's UNETLoader assumes 24 heads).
NO_TWIN: dict[str, str] = {}
# What each twin's picture shows: background colour, and the grid cell of each shape's colour.
EXPECTED = {
    "embedded_text_to_image": ("purple", {"orange": "center"}),
    "embedded_few_steps_text_to_image": ("black", {"white": "top right", "blue": "bottom left"}),
    "embedded_true_cfg_negative": ("yellow", {"red": "center"}),
    "embedded_img2img": ("blue", {"yellow": "center"}),
    "embedded_lora_stack": ("purple", {"yellow": "center"}),
    "embedded_controlnet_canny": ("blue", {"yellow": "top right"}),  # the caption says center; the edges win
    "embedded_core_model_scheduled_guidance": ("blue", {"green": "left", "white": "right"}),
    "embedded_regional_prompt": ("yellow", {"red": "left", "blue": "top right"}),
    "embedded_train_lora": ("blue", {"red": "center"}),
}
TRAIN_TWIN = "embedded_train_lora"  # trains for about half a minute: run once per session (`trained_twin`)


def _node(prompt: dict, class_type: str) -> str:
    [node_id] = [k for k, n in prompt.items() if n["class_type"] == class_type]
    return node_id


def _picture(server, prompt: dict, result=None) -> np.ndarray:
    result = result or server.run(prompt)
    errors = [m["data"] for m in result.messages if m["type"] == "execution_error"]
    assert result.status == "success", errors
    [image] = [server.view_image(f) for f in result.outputs[_node(prompt, "SaveImage")]["images"]]
    assert image.size == (SIZE, SIZE)
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def trained_twin(embedded_server):
    """The training twin run once as shipped: its picture and the server's result. The LoRA it trains lands in
    ComfyUI's own models/loras and is removed afterwards."""
    prompt = load_api(TRAIN_TWIN)
    result = embedded_server.run(prompt, timeout=600)
    try:
        yield _picture(embedded_server, prompt, result), result
    finally:
        if result.status == "success":
            remove_trained_files(result.outputs, training_nodes(load_ui(TRAIN_TWIN)))


def test_every_real_example_has_an_embedded_twin():
    real = {n for n in workflow_names() if not n.startswith(PREFIX)}
    assert {t.source for t in TWINS.values()} == real - set(NO_TWIN)
    assert sorted(n for n in workflow_names() if n.startswith(PREFIX)) == sorted(TWINS) == sorted(EXPECTED)


def test_the_server_lists_only_the_embedded_files(embedded_object_info):
    def choices(node: str, name: str) -> list[str]:
        return embedded_object_info[node]["input"]["required"][name][0]

    assert choices("FluxWorksModelLoader", "model_name") == [EMBEDDED_FILES["model_name"]]
    t5, clip = choices("FluxWorksTextEncoderLoader", "t5_name"), choices("FluxWorksTextEncoderLoader", "clip_name")
    assert EMBEDDED_FILES["t5_name"] in t5 and EMBEDDED_FILES["clip_name"] in clip
    assert set(t5) | set(clip) == {EMBEDDED_FILES["t5_name"], EMBEDDED_FILES["clip_name"]}
    assert EMBEDDED_FILES["vae_name"] in choices("VAELoader", "vae_name")
    assert choices("FluxWorksControlNetLoader", "control_net_name") == [EMBEDDED_CONTROLNET]


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_files_are_what_the_writer_makes(name, embedded_object_info):
    """The shipped files match devtools/embedded_examples.py run on today's real example and nodes, and the UI
    file converts to exactly its API copy (what the frontend queues)."""
    assert build_twin(name, embedded_object_info) == load_ui(name)
    assert ui_to_api(load_ui(name), embedded_object_info) == load_api(name)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_runs_as_shipped_and_draws_what_it_asks_for(name, embedded_server, request):
    picture = (request.getfixturevalue("trained_twin")[0] if name == TRAIN_TWIN
               else _picture(embedded_server, load_api(name)))
    background, found = analyse(picture)
    expected_background, shapes = EXPECTED[name]
    assert background == expected_background
    assert {colour: found[colour].position for colour in shapes if colour in found} == shapes


def test_the_lora_draws_a_diamond_the_base_model_does_not(embedded_server):
    """A diamond fills about half of its bounding box; the base model, which never saw the word, draws a
    blob that fills 0.8 of it (a square: 1.0). Measured here: 0.61 with the LoRA, 0.83 without."""
    prompt = load_api("embedded_lora_stack")
    stack = _node(prompt, "FluxWorksLoraStack")
    off = copy.deepcopy(prompt)
    off[stack]["inputs"]["rows"] = json.dumps([{**row, "enabled": False} for row in
                                               json.loads(prompt[stack]["inputs"]["rows"])], separators=(",", ":"))
    extent = {label: analyse(_picture(embedded_server, p))[1]["yellow"].features[0]
              for label, p in (("with", prompt), ("without", off))}
    assert extent["with"] < 0.70 and extent["without"] > 0.75, extent


def test_without_the_controlnet_the_square_goes_where_the_prompt_says(embedded_server):
    prompt = load_api("embedded_controlnet_canny")
    prompt[_node(prompt, "FluxWorksSampler")]["inputs"]["positive"] = [_node(prompt, "FluxWorksTextEncode"), 0]
    background, found = analyse(_picture(embedded_server, prompt))
    assert background == "blue" and found["yellow"].position == "center"


def test_img2img_keeps_no_red_from_the_drawn_input(embedded_server):
    prompt = load_api("embedded_img2img")
    assert colour_share(_picture(embedded_server, prompt), "red") < 0.01


def test_the_trained_lora_draws_the_cross_the_base_model_does_not(embedded_server, trained_twin):
    """The training twin's own LoRA, trained as shipped, turns "a large red ciel" into the cross it was shown (a
    cross whose arms are a third of its side fills 5/9 of its bounding box); the same prompt without the LoRA (the
    sampler fed by the loader, the training branch left out) draws no such shape. Measured here (CPU, one thread):
    with the LoRA a red object in the center filling 0.47 of its box, without it no red object at all."""
    picture, result = trained_twin
    text = result.outputs[_node(load_api(TRAIN_TWIN), "FluxWorksTrainLora")]["text"][0]
    assert " after 150 steps" in text, text
    prompt = load_api(TRAIN_TWIN)
    apply, sampler = _node(prompt, "FluxWorksApplyLoraStack"), _node(prompt, "FluxWorksSampler")
    prompt[sampler]["inputs"]["model"] = prompt[apply]["inputs"]["flux_model"]
    save = _node(prompt, "SaveImage")
    needed, todo = set(), [save]
    while todo:  # the save node's inputs, transitively: the base-model branch only
        node_id = todo.pop()
        needed.add(node_id)
        todo += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and v[0] not in needed]
    base = _picture(embedded_server, {k: v for k, v in prompt.items() if k in needed})
    with_lora, without = analyse(picture)[1]["red"], analyse(base)[1].get("red")
    assert with_lora.features[0] < 0.70, with_lora
    assert without is None or without.features[0] > 0.75, without
    assert np.abs(picture.astype(int) - base.astype(int)).mean() > 5
