"""Write the embedded-model examples: beside each real-weight example in example_workflows/, a twin that runs as
shipped on a ComfyUI whose only models are the pack's embedded ones (embedded_model/).

A twin keeps its example's graph and layout and changes what the embedded model needs: its files, its recommended
settings (12 steps, guidance 2, T5 length 128, 128x128), a caption in its grammar, the example LoRA and
ControlNet trained for it, and input pictures drawn with core nodes (EmptyImage + ImageCompositeMasked), since
LoadImage reads only ComfyUI's own input/ folder, which a pack must not write into. Each twin is then run on a
real server and its thumbnail (<name>.jpg, which the Templates browser shows) is made from its output.

`core_model_scheduled_guidance`'s twin swaps core's UNETLoader for FluxWorks Load Core Model: core's loader builds
every FLUX.1 with 24 heads of 128 (width 3072), so it cannot load the 2-head embedded transformer; ours reads the
architecture from the file and gives KSampler the same core MODEL.

Usage: python -m devtools.embedded_examples   (rewrites example_workflows/embedded_*.json, their api/ copies
and thumbnails; starts its own ComfyUI server on the CPU, a few minutes: the training twin trains for about one)
       python -m devtools.embedded_examples embedded_train_lora   (just that twin)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from devtools.comfy_server import ComfyServer, remove_trained_files
from devtools.paths import REPO
from devtools.workflow_format import input_names, input_spec, ui_to_api, widget_names

logger = logging.getLogger(__name__)

EXAMPLES_DIR = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(EXAMPLES_DIR, "api")
PREFIX = "embedded_"
# The embedded files, by the loader input that names them (the pack lists them in every ComfyUI).
EMBEDDED_FILES = {
    "model_name": "flux1-shapes-tiny.safetensors",
    "t5_name": "t5xxl_shapes_tiny.safetensors",
    "clip_name": "clip_l_shapes_tiny.safetensors",
    "vae_name": "taef1_shapes_tiny.safetensors",
}
EMBEDDED_LORA = "flux1-shapes-tiny-lora-diamond.safetensors"
EMBEDDED_CONTROLNET = "flux1-shapes-tiny-controlnet-canny.safetensors"
SIZE = 128  # evaluation.embedded.IMAGE_SIZE, RECOMMENDED_STEPS, RECOMMENDED_GUIDANCE, RECOMMENDED_T5_LENGTH
STEPS, GUIDANCE, T5_LENGTH = 12, 2.0, "128"
# True CFG with the twin's prompts, 4 seeds: adherence 1.0 at CFG 1.5, 0.85 at 2 (stray blotches), 0.6 at 2 with
# the distilled guidance at 1 (docs/embedded_model.md measures the same fall with the negative "red").
TRUE_CFG = 1.5
# The core-model twin's curve (linear, start -> end), chosen from the measurement in example_workflows/README.md.
CORE_CURVE = (3.0, 1.5)
THUMBNAIL_SCALE = 3  # 128 px outputs shown at 384 px, nearest neighbour, so the pixels stay sharp
# Where a grid cell's centre is at 128 px (training.shapes.cell_centre): columns/rows at 21.3, 64, 106.7.
CELL_CENTRES = {"left": 21.33, "center": 64.0, "right": 106.67}
LARGE_SQUARE = 29  # side in pixels of a "large" square (2 x 0.9 x 16)

Workflow = dict  # UI format (version 0.4)


# --- editing UI-format workflows -------------------------------------------------------------------------

def find(workflow: Workflow, node_type: str, title: str | None = None) -> dict:
    """The one node of `node_type` (and `title`, when several share the type)."""
    nodes = [n for n in workflow["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title)]
    if len(nodes) != 1:
        raise ValueError(f"expected one {node_type} node{f' titled {title!r}' if title else ''}, found {len(nodes)}")
    return nodes[0]


def set_widgets(node: dict, object_info: dict, **values) -> None:
    """Set widget values by name (the positions come from /object_info, as the frontend lays them out)."""
    names = widget_names(object_info[node["type"]])
    for name, value in values.items():
        if name not in names:
            raise KeyError(f"{node['type']} has no widget {name!r}; its widgets are {names}")
        node["widgets_values"][names.index(name)] = value


def add_node(workflow: Workflow, object_info: dict, node_type: str, pos: list[int], size: list[int],
             title: str | None = None, **values) -> dict:
    """A new node as the frontend saves one: socket inputs first (optional ones with shape 7), then one input
    per widget, outputs from /object_info, widget values from the node's defaults and `values`."""
    info = object_info[node_type]
    inputs, widgets = [], {}
    for name, required in input_names(info):
        kind, options = input_spec(info, name)
        if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or options.get("forceInput"):
            inputs.append({"localized_name": name, "name": name, **({} if required else {"shape": 7}),
                           "type": kind, "link": None})
        else:
            widgets[name] = options.get("default", options.get("options", [None])[0])
    optional = {name for name, required in input_names(info) if not required}
    for name in widgets:
        kind, _ = input_spec(info, name)
        inputs.append({"localized_name": name, "name": name, **({"shape": 7} if name in optional else {}),
                       "type": kind, "widget": {"name": name}, "link": None})
    workflow["last_node_id"] += 1
    node = {"id": workflow["last_node_id"], "type": node_type, "pos": pos, "size": size, "flags": {}, "order": 0,
            "mode": 0, "inputs": inputs,
            "outputs": [{"localized_name": name, "name": name, "type": kind, "links": []}
                        for kind, name in zip(info["output"], info["output_name"], strict=True)],
            **({"title": title} if title else {}), "properties": {"Node name for S&R": node_type},
            "widgets_values": [widgets.get(name) for name in widget_names(info)]}
    set_widgets(node, object_info, **values)
    workflow["nodes"].append(node)
    return node


def _slot(node: dict, input_name: str) -> int:
    for i, slot in enumerate(node["inputs"]):
        if slot["name"] == input_name:
            return i
    raise KeyError(f"node {node['id']} ({node['type']}) has no input {input_name!r}")


def connect(workflow: Workflow, source: dict, output: int, target: dict, input_name: str) -> None:
    """Link `source`'s output to `target`'s input, replacing the link that input had."""
    slot = _slot(target, input_name)
    old = target["inputs"][slot]["link"]
    if old is not None:
        drop_link(workflow, old)
    workflow["last_link_id"] += 1
    link_id, kind = workflow["last_link_id"], source["outputs"][output]["type"]
    workflow["links"].append([link_id, source["id"], output, target["id"], slot, kind])
    source["outputs"][output]["links"] = [*(source["outputs"][output]["links"] or []), link_id]
    target["inputs"][slot]["link"] = link_id


def drop_link(workflow: Workflow, link_id: int) -> None:
    [link] = [link for link in workflow["links"] if link[0] == link_id]
    workflow["links"].remove(link)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = nodes[link[1]]["outputs"][link[2]]["links"]
    links.remove(link_id)
    nodes[link[3]]["inputs"][link[4]]["link"] = None


def remove_node(workflow: Workflow, node: dict) -> None:
    for link in [link for link in workflow["links"] if node["id"] in (link[1], link[3])]:
        drop_link(workflow, link[0])
    workflow["nodes"].remove(node)


def set_order(workflow: Workflow) -> None:
    """Number the nodes' `order` in an execution order (sources first), as the frontend saves it."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    parents = {i: {link[1] for link in workflow["links"] if link[3] == i} for i in nodes}
    done: list[int] = []
    while len(done) < len(nodes):
        ready = sorted(i for i in nodes if i not in done and parents[i] <= set(done))
        if not ready:
            raise ValueError("the workflow has a cycle")
        done += ready
    for order, node_id in enumerate(done):
        nodes[node_id]["order"] = order


def set_group(workflow: Workflow, index: int, title: str, height: int | None = None) -> None:
    group = workflow["groups"][index]
    group["title"] = title
    if height is not None:
        group["bounding"][3] = height


def use_embedded_files(workflow: Workflow, object_info: dict) -> None:
    """Every loader names the embedded files; every latent is 128x128; every prompt is encoded at T5 length 128."""
    for node in workflow["nodes"]:
        names = widget_names(object_info[node["type"]])
        files = {k: v for k, v in EMBEDDED_FILES.items() if k in names}
        if files:
            set_widgets(node, object_info, **files)
        if node["type"] == "EmptySD3LatentImage":
            set_widgets(node, object_info, width=SIZE, height=SIZE)
        if node["type"] == "FluxWorksTextEncode":
            set_widgets(node, object_info, max_sequence_length=T5_LENGTH)


def draw_picture(workflow: Workflow, object_info: dict, x: int, y: int, background: int, colour: int,
                 left: int, top: int, what: str) -> tuple[dict, int]:
    """Core nodes that draw a square of `colour` at (left, top) on a 128x128 `background` (0xRRGGBB); returns
    the node whose IMAGE output is the picture, and the y below the last node."""
    canvas = add_node(workflow, object_info, "EmptyImage", [x, y], [320, 130], "Background",
                      width=SIZE, height=SIZE, batch_size=1, color=background)
    shape = add_node(workflow, object_info, "EmptyImage", [x, y + 200], [320, 130], "Large square",
                     width=LARGE_SQUARE, height=LARGE_SQUARE, batch_size=1, color=colour)
    picture = add_node(workflow, object_info, "ImageCompositeMasked", [x, y + 400], [320, 150], what,
                       x=left, y=top, resize_source=False)
    connect(workflow, canvas, 0, picture, "destination")
    connect(workflow, shape, 0, picture, "source")
    return picture, y + 400 + 150 + 70


def corner(cell: str) -> int:
    """Top-left pixel of a large square centred in a grid column or row ("left", "center", "right")."""
    return round(CELL_CENTRES[cell] - LARGE_SQUARE / 2)


# --- the twins -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Twin:
    source: str  # the real-weight example it mirrors
    edit: Callable[[Workflow, dict], None]
    summary: str  # one line for example_workflows/README.md


def _text_to_image(workflow: Workflow, object_info: dict) -> None:
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info,
                prompt="a large orange circle in the center, on a purple background")
    set_widgets(find(workflow, "FluxWorksGuidanceSchedule"), object_info, start_value=GUIDANCE, end_value=GUIDANCE,
                shape="constant")
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=7, steps=STEPS, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_text_to_image")
    set_group(workflow, 1, "Prompt and guidance (2)")
    set_group(workflow, 2, "Sample (12 steps)")


def _few_steps(workflow: Workflow, object_info: dict) -> None:
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info,
                prompt="a small white star at the top right and a large blue square at the bottom left, "
                       "on a black background")
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=3, steps=4, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_few_steps")
    set_group(workflow, 1, "Prompt (T5 length 128)")
    set_group(workflow, 2, "Sample (4 steps)")


def _true_cfg(workflow: Workflow, object_info: dict) -> None:
    set_widgets(find(workflow, "FluxWorksTextEncode", "Positive prompt"), object_info,
                prompt="a large red star in the center, on a yellow background")
    set_widgets(find(workflow, "FluxWorksTextEncode", "Negative prompt"), object_info,
                prompt="a large red circle in the center, on a yellow background")
    set_widgets(find(workflow, "FluxWorksGuidanceSchedule"), object_info, start_value=GUIDANCE, end_value=GUIDANCE,
                cfg_scale=TRUE_CFG, cfg_start_percent=0.0, cfg_end_percent=0.5)
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=5, steps=STEPS, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_true_cfg")
    set_group(workflow, 1, "Prompts (negative: a circle)")
    set_group(workflow, 2, "True CFG 1.5 in the first half")


def _img2img(workflow: Workflow, object_info: dict) -> None:
    load, scale, encode = find(workflow, "LoadImage"), find(workflow, "ImageScale"), find(workflow, "VAEEncode")
    x, y = load["pos"]
    picture, below = draw_picture(workflow, object_info, x, y, 0x255AE1, 0xDC2626, corner("center"),
                                  corner("center"), "Red square in the center")
    remove_node(workflow, load)
    remove_node(workflow, scale)
    encode["pos"] = [x, below]
    connect(workflow, picture, 0, encode, "pixels")
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info,
                prompt="a large yellow square in the center, on a blue background")
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=11, steps=STEPS, guidance=GUIDANCE,
                denoise=0.75)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_img2img")
    set_group(workflow, 1, "Input (core nodes)", below + 46 + 40 - 25)
    set_group(workflow, 2, "Prompt and sample (denoise 0.75)")


def _lora_stack(workflow: Workflow, object_info: dict) -> None:
    rows = [{"lora": EMBEDDED_LORA, "strength": 1.0, "enabled": True}]
    set_widgets(find(workflow, "FluxWorksLoraStack"), object_info, rows=json.dumps(rows, separators=(",", ":")))
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info,
                prompt="a large yellow diamond in the center, on a purple background")
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=1, steps=STEPS, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_lora")
    set_group(workflow, 0, "Models, the diamond LoRA")
    set_group(workflow, 1, "Apply the stack, prompt")


def _controlnet(workflow: Workflow, object_info: dict) -> None:
    load, canny, preview = find(workflow, "LoadImage"), find(workflow, "FluxWorksCannyEdges"), find(workflow,
                                                                                                   "PreviewImage")
    x, y = load["pos"]
    picture, below = draw_picture(workflow, object_info, x, y, 0x000000, 0xFFFFFF, corner("right"), corner("left"),
                                  "White square at the top right")
    remove_node(workflow, load)
    canny["pos"] = [x, below]
    preview["pos"] = [x, below + 106 + 70]
    connect(workflow, picture, 0, canny, "image")
    set_widgets(find(workflow, "FluxWorksControlNetLoader"), object_info, control_net_name=EMBEDDED_CONTROLNET)
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info,
                prompt="a large yellow square in the center, on a blue background")
    set_widgets(find(workflow, "FluxWorksControlNetApply"), object_info, strength=1.0, start_percent=0.0,
                end_percent=1.0)
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=1, steps=STEPS, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_controlnet")
    set_group(workflow, 1, "Control picture, edges", preview["pos"][1] + 300 + 20 - 25)
    set_group(workflow, 2, "Prompt: center; edges: top right")


def _core_model(workflow: Workflow, object_info: dict) -> None:
    unet = find(workflow, "UNETLoader")
    [link] = [link for link in workflow["links"] if link[1] == unet["id"]]
    schedule_model = next(n for n in workflow["nodes"] if n["id"] == link[3])
    loader = add_node(workflow, object_info, "FluxWorksCoreModelLoader", unet["pos"], unet["size"],
                      model_name=EMBEDDED_FILES["model_name"], weight_dtype="default")
    remove_node(workflow, unet)
    connect(workflow, loader, 0, schedule_model, "model")
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info,
                prompt="a large green triangle on the left and a small white circle on the right, on a blue background")
    set_widgets(find(workflow, "FluxWorksGuidanceSchedule"), object_info, start_value=CORE_CURVE[0],
                end_value=CORE_CURVE[1])
    set_widgets(find(workflow, "KSampler"), object_info, seed=2, steps=STEPS)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_core_model")
    set_group(workflow, 0, "Embedded model as core MODEL")
    set_group(workflow, 1, f"Guidance {CORE_CURVE[0]:g} to {CORE_CURVE[1]:g} on the MODEL")
    set_group(workflow, 3, "Core KSampler (12 steps, cfg 1.0)")


# The regional twin: the whole caption as the global prompt, and one rectangle per object (its grid cell) with the
# object's own caption, as evaluation/regional.py asks for a layout.
REGIONAL_SEED = 1
REGIONAL_CAPTION = "a large red circle on the left and a small blue square at the top right, on a yellow background"


def _regional(workflow: Workflow, object_info: dict) -> None:
    from evaluation.regional import Layout, node_rows
    from training.shapes import parse_caption

    rows = [{**row, "strength": 1.0, "on": True} for row in node_rows(Layout(REGIONAL_CAPTION,
                                                                             parse_caption(REGIONAL_CAPTION)))]
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    set_widgets(find(workflow, "FluxWorksTextEncode"), object_info, prompt=REGIONAL_CAPTION)
    set_widgets(find(workflow, "FluxWorksRegionalPrompt"), object_info, regions=json.dumps(rows, separators=(",", ":")))
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=REGIONAL_SEED, steps=STEPS, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_regional_prompt")
    set_group(workflow, 1, "Global prompt and a region per shape")


# The training twin: pictures of a plus-shaped cross, a shape the embedded model never saw, named by the rare token
# "ciel" (one T5 piece, docs/training.md), drawn with core nodes (a cross mask from SolidMask + MaskComposite, one
# ImageCompositeMasked per picture), trained for a short CPU run, then sampled with the LoRA it made.
CONCEPT_TOKEN = "ciel"
CROSS, CROSS_ARM = 30, 10  # the cross's side and arm width in pixels (about a "large" shape's size)
# (colour, background, position) of each training picture; the sampled caption is the first one.
TRAIN_PICTURES = (("red", "blue", "center"), ("yellow", "purple", "top left"), ("white", "black", "right"),
                  ("green", "yellow", "bottom"))
# Grid position -> (column, row) keys of CELL_CENTRES.
_CELLS = {"center": ("center", "center"), "top left": ("left", "left"), "right": ("right", "center"),
          "bottom": ("center", "right")}
TRAIN_SETTINGS = {"steps": 150, "rank": 16, "alpha": 16.0, "learning_rate": 2e-3, "lr_schedule": "cosine",
                  "lr_warmup_steps": 0, "batch_size": 4, "gradient_checkpointing": False, "lora_layers": "all",
                  "guidance": GUIDANCE, "save_every": 0}
TRAINED_LORA = "embedded_ciel_cross"


def train_caption(colour: str, background: str, position: str) -> str:
    from training.shapes import POSITION_PHRASES

    return f"a large {colour} {CONCEPT_TOKEN} {POSITION_PHRASES[position]}, on a {background} background"


def _rgb(colour: str) -> int:
    from training.shapes import COLOURS

    r, g, b = COLOURS[colour]
    return (r << 16) | (g << 8) | b


def draw_crosses(workflow: Workflow, object_info: dict, x: int, y: int) -> dict:
    """Core nodes that draw TRAIN_PICTURES (a cross mask, then a colour square composited through it onto each
    background) and batch them; returns the node whose IMAGE output is the batch."""
    empty = add_node(workflow, object_info, "SolidMask", [x, y], [320, 106], "Cross: empty", value=0.0,
                     width=CROSS, height=CROSS)
    across = add_node(workflow, object_info, "SolidMask", [x, y + 160], [320, 106], "Cross: bar across", value=1.0,
                      width=CROSS, height=CROSS_ARM)
    down = add_node(workflow, object_info, "SolidMask", [x, y + 320], [320, 106], "Cross: bar down", value=1.0,
                    width=CROSS_ARM, height=CROSS)
    half = add_node(workflow, object_info, "MaskComposite", [x, y + 480], [320, 130], "Cross: + across", x=0,
                    y=(CROSS - CROSS_ARM) // 2, operation="or")
    mask = add_node(workflow, object_info, "MaskComposite", [x, y + 660], [320, 130], "Cross mask", x=(CROSS -
                    CROSS_ARM) // 2, y=0, operation="or")
    connect(workflow, empty, 0, half, "destination")
    connect(workflow, across, 0, half, "source")
    connect(workflow, half, 0, mask, "destination")
    connect(workflow, down, 0, mask, "source")
    pictures = []
    for i, (colour, background, position) in enumerate(TRAIN_PICTURES):
        column, row = _CELLS[position]
        px = x + 360 * (i + 1)
        canvas = add_node(workflow, object_info, "EmptyImage", [px, y], [320, 130], f"{background.title()} background",
                          width=SIZE, height=SIZE, batch_size=1, color=_rgb(background))
        paint = add_node(workflow, object_info, "EmptyImage", [px, y + 200], [320, 130], f"{colour.title()} paint",
                         width=CROSS, height=CROSS, batch_size=1, color=_rgb(colour))
        picture = add_node(workflow, object_info, "ImageCompositeMasked", [px, y + 400], [320, 150],
                           f"{colour.title()} cross {position}", x=round(CELL_CENTRES[column] - CROSS / 2),
                           y=round(CELL_CENTRES[row] - CROSS / 2), resize_source=False)
        connect(workflow, canvas, 0, picture, "destination")
        connect(workflow, paint, 0, picture, "source")
        connect(workflow, mask, 0, picture, "mask")
        pictures.append(picture)
    batch = pictures[0]
    for i, picture in enumerate(pictures[1:]):
        joined = add_node(workflow, object_info, "ImageBatch", [x + 360 * (len(pictures) + 1), y + 100 * i],
                          [240, 46], f"Batch {i + 2} pictures")
        connect(workflow, batch, 0, joined, "image1")
        connect(workflow, picture, 0, joined, "image2")
        batch = joined
    return batch


def _train_lora(workflow: Workflow, object_info: dict) -> None:
    dataset, train = find(workflow, "FluxWorksLoraDataset"), find(workflow, "FluxWorksTrainLora")
    bottom = max(g["bounding"][1] + g["bounding"][3] for g in workflow["groups"])
    top = bottom + 50
    batch = draw_crosses(workflow, object_info, 40, top + 85)
    workflow["groups"].append({"id": len(workflow["groups"]) + 1, "title": "Training pictures (core nodes)",
                               "bounding": [20, top, 360 * (len(TRAIN_PICTURES) + 1) + 300, 880],
                               "color": "#a88", "font_size": 24, "flags": {}})
    captions = [train_caption(*picture) for picture in TRAIN_PICTURES]
    connect(workflow, batch, 0, dataset, "images")
    dataset["title"] = "Dataset: the drawn pictures"
    set_widgets(dataset, object_info, folder="", resolution=SIZE, max_sequence_length=T5_LENGTH,
                captions="\n".join(captions))
    set_widgets(train, object_info, lora_name=TRAINED_LORA, **TRAIN_SETTINGS, validate_every=TRAIN_SETTINGS["steps"],
                validation_steps=STEPS, validation_guidance=GUIDANCE)
    set_widgets(find(workflow, "FluxWorksTextEncode", "Validation prompt"), object_info, prompt=captions[0])
    set_widgets(find(workflow, "FluxWorksTextEncode", "Prompt"), object_info, prompt=captions[0])
    set_widgets(find(workflow, "FluxWorksSampler"), object_info, seed=1, steps=STEPS, guidance=GUIDANCE)
    set_widgets(find(workflow, "SaveImage"), object_info, filename_prefix="FluxWorks/embedded_train_lora")
    set_group(workflow, 1, "Dataset: the pictures below")
    set_group(workflow, 2, f"Train LoRA ({TRAIN_SETTINGS['steps']} steps, CPU)")


TWINS: dict[str, Twin] = {
    "embedded_text_to_image": Twin("flux_dev_text_to_image", _text_to_image,
                                   "text to image at the recommended settings (the `make demo` picture)"),
    "embedded_few_steps_text_to_image": Twin("flux_schnell_text_to_image", _few_steps,
                                             "4 steps and no guidance curve, two shapes"),
    "embedded_true_cfg_negative": Twin("flux_dev_true_cfg_negative", _true_cfg,
                                       "true CFG 1.5 in the first half of the steps: a red star, with the negative "
                                       "\"a large red circle ...\""),
    "embedded_img2img": Twin("flux_dev_img2img", _img2img,
                             "a red square drawn with core nodes, re-drawn yellow at denoise 0.75"),
    "embedded_lora_stack": Twin("flux_dev_lora_stack", _lora_stack,
                                f"the example LoRA `{EMBEDDED_LORA}`, which teaches the word \"diamond\""),
    "embedded_controlnet_canny": Twin("flux_dev_controlnet_canny", _controlnet,
                                      f"the example ControlNet `{EMBEDDED_CONTROLNET}`: Canny edges of a drawn "
                                      "square move the shape the prompt puts in the center to the top right"),
    "embedded_core_model_scheduled_guidance": Twin(
        "core_model_scheduled_guidance", _core_model,
        "FluxWorks Load Core Model gives core's KSampler the embedded model (core's UNETLoader cannot build it), "
        "with a guidance curve on the MODEL"),
    "embedded_regional_prompt": Twin("flux_dev_regional_prompt", _regional,
                                     "FluxWorks Regional Prompt: the whole caption as the global prompt and a rectangle "
                                     "per shape with its own caption"),
    "embedded_train_lora": Twin("flux_dev_train_lora", _train_lora,
                                f"FluxWorks LoRA Dataset + Train LoRA on four crosses drawn with core nodes, named "
                                f"\"{CONCEPT_TOKEN}\", then a sample with the trained LORA_STACK"),
}


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build_twin(name: str, object_info: dict) -> Workflow:
    """The UI-format twin `name`, from its real-weight example and the server's /object_info."""
    twin = TWINS[name]
    workflow = copy.deepcopy(_read(os.path.join(EXAMPLES_DIR, twin.source + ".json")))
    workflow["id"] = f"00000000-0000-0000-0000-{0xE0 + list(TWINS).index(name):012x}"
    use_embedded_files(workflow, object_info)
    twin.edit(workflow, object_info)
    workflow["nodes"].sort(key=lambda n: n["id"])
    set_order(workflow)
    return workflow


def embedded_only_server(root: str) -> ComfyServer:
    """A CPU ComfyUI whose models tree is empty: the only models it lists are the pack's embedded ones."""
    server = ComfyServer(root)
    server.start()
    return server


def run_with_workflow(server: ComfyServer, prompt: dict, workflow: Workflow, timeout: float = 600.0):
    """Queue `prompt` as the frontend does, with the UI workflow in extra_pnginfo so that SaveImage writes it
    into the PNG next to the prompt."""
    return server.run(prompt, timeout=timeout, extra_data={"extra_pnginfo": {"workflow": workflow}})


def thumbnail(server: ComfyServer, result, workflow: Workflow) -> Image.Image:
    """The output (and, where the workflow previews its edges, the edges left of it) scaled up for the browser."""
    panels = []
    for node_type in ("PreviewImage", "SaveImage"):
        for node in (n for n in workflow["nodes"] if n["type"] == node_type):
            panels += [server.view_image(f) for f in result.outputs[str(node["id"])]["images"]]
    size = SIZE * THUMBNAIL_SCALE  # every panel this high, its width in proportion (a loss curve is 2:1)
    widths = [round(panel.width * size / panel.height) for panel in panels]
    sheet = Image.new("RGB", (sum(widths), size))
    for i, (panel, width) in enumerate(zip(panels, widths, strict=True)):
        sheet.paste(panel.convert("RGB").resize((width, size), Image.Resampling.NEAREST), (sum(widths[:i]), 0))
    return sheet


def training_nodes(workflow: Workflow) -> list[int]:
    """The ids of the workflow's FluxWorks Train LoRA nodes (their files are removed after a run)."""
    return [n["id"] for n in workflow["nodes"] if n["type"] == "FluxWorksTrainLora"]


def write_examples(server: ComfyServer, names: list[str]) -> dict[str, str]:
    """Write each twin (UI, API, thumbnail from its real output); returns name -> PNG path of the output."""
    object_info = server.get_json("/object_info")
    outputs = {}
    for name in names:
        workflow = build_twin(name, object_info)
        prompt = ui_to_api(workflow, object_info)
        _write(os.path.join(EXAMPLES_DIR, name + ".json"), workflow)
        _write(os.path.join(API_DIR, name + ".json"), prompt)
        result = run_with_workflow(server, prompt, workflow)
        if result.status != "success":
            raise RuntimeError(f"{name} failed on the server: {result.status}\n{server.log()[-3000:]}")
        thumbnail(server, result, workflow).save(os.path.join(EXAMPLES_DIR, name + ".jpg"), quality=92)
        remove_trained_files(result.outputs, training_nodes(workflow))
        [save] = [str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"]
        [file] = result.outputs[save]["images"]
        outputs[name] = os.path.join(server.output_dir, file["subfolder"], file["filename"])
        logger.info("%s: written, ran, thumbnail from %s", name, outputs[name])
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(TWINS), help=f"twins to write (default: all of {list(TWINS)})")
    parser.add_argument("--keep-outputs", default=None, help="copy each twin's output PNG (with its workflow) here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(TWINS))
    if unknown:
        parser.error(f"unknown twins {unknown}; known: {list(TWINS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = tempfile.mkdtemp(prefix="fluxworks-examples-")
    server = embedded_only_server(root)
    try:
        outputs = write_examples(server, args.names)
        if args.keep_outputs:
            os.makedirs(args.keep_outputs, exist_ok=True)
            for name, path in outputs.items():
                shutil.copyfile(path, os.path.join(args.keep_outputs, name + ".png"))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
