"""Headless Chromium on the ComfyUI page: the pack's widgets as a person meets them (issue 15, items 7, 9, 10).

The LoRA stack (hidden `rows` JSON, an error row for broken JSON, full file names, a text-encoder strength per
row, the hint when models/loras is empty), the Apply node's report wrapped between words, the guidance curve's
axes, step marks and true-CFG state, and the sampler's `guidance` widget greyed out while a schedule is linked.
Uses the system Chromium (Debian package `chromium`) through PyPI playwright; nothing is downloaded. The
screenshots the README shows are written to docs/img/.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.training.shapes import parse_caption
from tests.e2e.ui_workflows import copy_example_inputs, load_ui, set_values, widget_values, with_model_names
from tests.e2e.workflows import add_example_models
from tests.paths import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_IMG = os.path.join(REPO, "docs", "img")
ARTIFACTS = os.path.join(REPO, "test-artifacts")
STACK, APPLY, SCHEDULE, SAMPLER = ("FluxWorksLoraStack", "FluxWorksApplyLoraStack", "FluxWorksGuidanceSchedule",
                                   "FluxWorksSampler")
# A real-looking long LoRA name (67 characters): the stock combo showed "lor…" of names like it.
LONG_NAME = "flux_dev_watercolour_landscape_style_v2_rank16_epoch10.safetensors"
EXAMPLE_LORAS = ("example_lora", "example_lokr", "example_xlabs_lora")
STEP_RGB = (216, 238, 250)  # STEP_COLOR in js/guidance_curve.js
AXIS_RGB = (136, 136, 136)  # AXIS_COLOR
DPR = 2  # screenshots for the README at twice the CSS resolution

FIND = "(type) => app.graph.nodes.find(n => n.type === type)"


@pytest.fixture(scope="module")
def lora_names(comfy_server) -> dict[str, str]:
    """The LoRA-stack example's three files plus one with a long name, in the server's models/loras."""
    names = add_example_models(comfy_server.models_dir, comfy_server.model_names, EXAMPLE_LORAS)
    folder = os.path.join(comfy_server.models_dir, "loras")
    shutil.copyfile(os.path.join(folder, names["example_lora"]), os.path.join(folder, LONG_NAME))
    return {role: names[role] for role in EXAMPLE_LORAS} | {"long": LONG_NAME}


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


@pytest.fixture(scope="module")
def page(comfy_server, lora_names):
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    os.makedirs(DOCS_IMG, exist_ok=True)
    os.makedirs(ARTIFACTS, exist_ok=True)
    copy_example_inputs(comfy_server.input_dir)
    first_visit = not comfy_server.get_json("/settings").get("Comfy.TutorialCompleted")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=DPR)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(comfy_server.url)
        page.wait_for_function("window.app?.graph && ['FluxWorks.GuidanceCurve', 'FluxWorks.LoraStack'].every("
                               "name => window.app.extensions?.some(e => e.name === name))", timeout=60_000)
        if first_visit:  # a new user gets the Templates browser over an empty graph: close it as a person would
            dialog = page.locator("[role=dialog]")
            dialog.wait_for(state="visible", timeout=30_000)
            dialog.locator("button:has(i.pi-times)").click()
            dialog.wait_for(state="hidden", timeout=10_000)
        yield page
        browser.close()
    ours = [e for e in errors if "fluxworks" in e.lower() or "lora_stack" in e or "guidance_curve" in e]
    assert not ours, ours


# --- page helpers ---------------------------------------------------------------------------------------------

def load(page, workflow: dict, focus: tuple[str, ...]) -> None:
    """Load a UI-format workflow, then show the `focus` node types at scale 1, clear of the menus and minimap."""
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.evaluate("""(types) => {
      const nodes = app.graph.nodes.filter(n => types.includes(n.type));
      const ds = app.canvas.ds;
      ds.scale = 1;
      ds.offset = [110 - Math.min(...nodes.map(n => n.pos[0])), 200 - Math.min(...nodes.map(n => n.pos[1]))];
      app.canvas.setDirty(true, true);
    }""", list(focus))
    page.mouse.move(5, 990)  # off every node, so no tooltip covers what is checked
    page.wait_for_timeout(300)  # two frames: widgets get their positions, then what depends on them is drawn


def evaluate_on(page, node_type: str, body: str):
    """Evaluate `body` (a function of `node`) on the first node of `node_type`; JSON-able results only."""
    return page.evaluate(f"(t) => {{ const node = ({FIND})(t); return JSON.parse(JSON.stringify(({body})(node))); }}",
                         node_type)


def widgets(page, node_type: str) -> list[dict]:
    return evaluate_on(page, node_type, """(node) => node.widgets.map(w => ({
        name: w.name, label: w.label ?? null, type: w.type, value: w.value ?? null, hidden: Boolean(w.hidden),
        disabled: Boolean(w.disabled), visible: node.isWidgetVisible(w), shown: w.fluxworksShown ?? null,
        tooltip: w.tooltip ?? null, note: w.fluxworksNote ?? null, y: w.y, height: w.computedHeight ?? null,
        lines: w.fluxworksLines ?? null}))""")


def widget(page, node_type: str, name: str) -> dict:
    found = [w for w in widgets(page, node_type) if w["name"] == name]
    assert found, f"{node_type} has no widget {name!r}: {[w['name'] for w in widgets(page, node_type)]}"
    return found[0]


def css_point(page, node_type: str, x: float, y: float) -> tuple[float, float]:
    """Node-local canvas units -> CSS pixels of the page (where the mouse clicks)."""
    g = evaluate_on(page, node_type, """(node) => { const r = app.canvas.canvas.getBoundingClientRect();
        return {pos: [...node.pos], scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset],
                canvas: [r.left, r.top]}; }""")
    return (g["canvas"][0] + (g["pos"][0] + x + g["offset"][0]) * g["scale"],
            g["canvas"][1] + (g["pos"][1] + y + g["offset"][1]) * g["scale"])


def click_widget(page, node_type: str, name: str, where: str) -> None:
    """Click a widget as a person does: its right arrow ("right") or its middle ("middle").

    The canvas is redrawn first (a widget's position is where it was last drawn) and the click waits out
    LiteGraph's 300 ms double-click window: two quick clicks on one spot are a double click, which opens the
    number prompt instead of stepping the value (seen on a fast CI machine).
    """
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(400)
    w = widget(page, node_type, name)
    width = evaluate_on(page, node_type, "(node) => node.size[0]")
    x = width - 22 if where == "right" else width / 2
    page.mouse.click(*css_point(page, node_type, x, w["y"] + (w["height"] or 20) / 2))
    page.mouse.move(5, 990)
    page.wait_for_timeout(150)


def rows_value(page) -> str:
    return widget(page, STACK, "rows")["value"]


def queued_inputs(page, node_type: str) -> dict:
    """The inputs the frontend would queue for the node of `node_type` (graphToPrompt, as the Run button does)."""
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    [node] = [n for n in output.values() if n["class_type"] == node_type]
    return node["inputs"]


def node_screenshot(page, node_types: list[str], path: str, pad: int = 14) -> np.ndarray:
    """Screenshot of the nodes' bounding box (titles included); returns its pixels."""
    box = page.evaluate("""(types) => {
      const nodes = types.map(t => app.graph.nodes.find(n => n.type === t));
      const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
      const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
      const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
      return {x: r.left + (x0 + ds.offset[0]) * ds.scale, y: r.top + (y0 + ds.offset[1]) * ds.scale,
              width: (x1 - x0) * ds.scale, height: (y1 - y0) * ds.scale};
    }""", node_types)
    clip = {"x": box["x"] - pad, "y": box["y"] - pad, "width": box["width"] + 2 * pad, "height": box["height"] + 2 * pad}
    page.screenshot(path=path, clip=clip)
    return np.asarray(Image.open(path).convert("RGB"))


def page_pixels(page, name: str) -> np.ndarray:
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path)
    return np.asarray(Image.open(path).convert("RGB"))


def near(pixels: np.ndarray, x: float, y: float, rgb: tuple[int, int, int], radius: int = 2, tol: int = 60) -> bool:
    """Whether a pixel within `radius` CSS pixels of (x, y) (CSS) has colour `rgb`."""
    cx, cy, r = round(x * DPR), round(y * DPR), radius * DPR
    window = pixels[cy - r:cy + r + 1, cx - r:cx + r + 1, :3].astype(int)
    return bool((np.abs(window - np.array(rgb)).sum(axis=-1) < tol).any())


# --- workflows ------------------------------------------------------------------------------------------------

def lora_workflow(rows: list[dict] | str, width: float | None = None) -> dict:
    """The LoRA part of the LoRA-stack example (loaders, stack, apply; no groups) with other rows (a list, or raw
    text for broken JSON) and optionally another stack width; the apply node sits right of the stack."""
    workflow = load_ui("flux_dev_lora_stack")
    keep = {n["id"] for n in workflow["nodes"] if n["type"] in {STACK, APPLY, "FluxWorksModelLoader",
                                                                  "FluxWorksTextEncoderLoader"}}
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] in keep]
    workflow["links"] = [link for link in workflow["links"] if link[1] in keep and link[3] in keep]
    workflow["groups"] = []
    for node in workflow["nodes"]:
        for slot in node.get("outputs") or []:
            slot["links"] = [i for i in slot.get("links") or [] if i in {link[0] for link in workflow["links"]}]
    [stack] = [n for n in workflow["nodes"] if n["type"] == STACK]
    [apply] = [n for n in workflow["nodes"] if n["type"] == APPLY]
    stack["widgets_values"] = [rows if isinstance(rows, str) else json.dumps(rows)]
    if width is not None:
        stack["size"] = [width, stack["size"][1]]
    apply["pos"] = [stack["pos"][0] + stack["size"][0] + 60, stack["pos"][1]]
    return workflow


def schedule_workflow(comfy_server, object_info, **schedule) -> dict:
    """The text-to-image example (schedule -> sampler, no negative) with other schedule settings; the sampler
    sits level with the schedule at the height its widgets need, so the two make one picture."""
    workflow = with_model_names(load_ui("flux_dev_text_to_image"), comfy_server.model_names)
    [schedule_node] = [n for n in workflow["nodes"] if n["type"] == SCHEDULE]
    [sampler] = [n for n in workflow["nodes"] if n["type"] == SAMPLER]
    sampler["pos"] = [sampler["pos"][0], schedule_node["pos"][1]]
    sampler["size"] = [sampler["size"][0], 240]
    return set_values(workflow, SCHEDULE, schedule, object_info) if schedule else workflow


def curve(page) -> dict:
    page.wait_for_function(f"() => ({FIND})('{SCHEDULE}')?.fluxworksCurve?.axes", timeout=10_000)
    return evaluate_on(page, SCHEDULE, "(node) => node.fluxworksCurve")


# --- LoRA stack -----------------------------------------------------------------------------------------------

def test_lora_rows_hide_the_json_show_full_names_and_edit_text_strength(page, lora_names):
    rows = [{"lora": lora_names["example_lora"], "strength": 0.8, "enabled": True},
            {"lora": LONG_NAME, "strength": 0.6, "enabled": True, "text_strength": 0.3},
            {"lora": lora_names["example_xlabs_lora"], "strength": 1.0, "enabled": False}]
    load(page, lora_workflow(rows, width=480), (STACK,))
    text = rows_value(page)
    assert json.loads(text) == rows

    # The JSON is the serialized value (saved and queued) but not on screen.
    raw = widget(page, STACK, "rows")
    assert raw["hidden"] and not raw["visible"]
    assert json.loads(queued_inputs(page, STACK)["rows"]) == rows
    saved = page.evaluate(f"() => app.graph.serialize().nodes.find(n => n.type === '{STACK}').widgets_values")
    assert saved == [text]

    # One set of widgets per row; names in full at this width, the file name as the tooltip.
    names = [w["name"] for w in widgets(page, STACK)]
    for i in (1, 2, 3):
        assert [f"LoRA {i}", f"lora {i}", f"strength {i}", f"text strength {i}", f"remove LoRA {i}"] == \
            names[names.index(f"LoRA {i}"):names.index(f"LoRA {i}") + 5]
    for i, row in enumerate(rows, start=1):
        file = widget(page, STACK, f"lora {i}")
        assert file["value"] == row["lora"] and file["shown"] == row["lora"] and file["tooltip"] == row["lora"]
    assert widget(page, STACK, "LoRA 3")["value"] is False

    # The text-encoder strength: row 2 has its own, rows 1 and 3 follow strength (and say so).
    assert widget(page, STACK, "text strength 2")["value"] == 0.3
    assert widget(page, STACK, "text strength 1")["value"] == 0.8
    assert widget(page, STACK, "text strength 1")["label"] == "text strength 1 (= strength)"
    node_screenshot(page, [STACK], os.path.join(DOCS_IMG, "lora_stack.png"))

    # A person clicks the right arrow of row 1's text strength: it becomes its own value, in the queued JSON.
    click_widget(page, STACK, "text strength 1", "right")
    edited = json.loads(rows_value(page))
    assert edited[0]["strength"] == 0.8 and edited[0]["text_strength"] > 0.8
    assert widget(page, STACK, "text strength 1")["label"] == "text strength 1"
    assert json.loads(queued_inputs(page, STACK)["rows"])[0]["text_strength"] == edited[0]["text_strength"]
    # ... and row 3's strength arrow moves its (following) text strength along, without writing text_strength.
    click_widget(page, STACK, "strength 3", "right")
    edited = json.loads(rows_value(page))
    assert edited[2]["strength"] > 1.0 and "text_strength" not in edited[2]
    assert widget(page, STACK, "text strength 3")["value"] == edited[2]["strength"]

    # Narrowed to the saved example width, the long name is shortened in the middle, never to "lor…".
    page.evaluate(f"() => {{ const n = ({FIND})('{STACK}'); n.setSize([323, n.size[1]]); app.canvas.setDirty(true, true); }}")
    page.wait_for_timeout(200)
    shown = widget(page, STACK, "lora 2")["shown"]
    head, _, tail = shown.partition("…")
    assert tail and LONG_NAME.startswith(head) and LONG_NAME.endswith(tail), shown
    assert len(head) >= 10 and tail.endswith(".safetensors"), shown
    assert widget(page, STACK, "lora 2")["tooltip"] == LONG_NAME
    assert widget(page, STACK, "lora 1")["shown"] == lora_names["example_lora"]


def test_broken_rows_json_shows_an_error_row_instead_of_stale_rows(page, lora_names):
    rows = [{"lora": lora_names["example_lora"], "strength": 0.8}]
    load(page, lora_workflow(rows), (STACK,))
    assert widget(page, STACK, "lora 1")["value"] == lora_names["example_lora"]

    # Another extension (or a person with the console) sets broken JSON: the rows go, an error row says why.
    broken = '[{"lora": "' + lora_names["example_lora"] + '", "strength": 0.8},'
    evaluate_on(page, STACK, f"""(node) => {{ const w = node.widgets.find(w => w.name === 'rows');
        w.value = {json.dumps(broken)}; w.callback?.(w.value, app.canvas, node); return null; }}""")
    names = [w["name"] for w in widgets(page, STACK)]
    assert names == ["rows", "rows error"], names
    error = widget(page, STACK, "rows error")
    assert "not valid JSON" in error["note"] and "Click here to edit" in error["note"]
    assert queued_inputs(page, STACK)["rows"] == broken  # queued as is: the server names the problem

    # A workflow saved with broken rows loads the same way.
    load(page, lora_workflow(broken), (STACK,))
    assert [w["name"] for w in widgets(page, STACK)] == ["rows", "rows error"]
    page.wait_for_timeout(200)
    assert widget(page, STACK, "rows error")["lines"], "the error row was not drawn"
    node_screenshot(page, [STACK], os.path.join(ARTIFACTS, "widgets_lora_rows_error.png"))

    # Clicking the error row opens the JSON; fixing it there brings the rows back.
    click_widget(page, STACK, "rows error", "middle")
    editor = page.locator(".graphdialog .value")
    editor.wait_for(state="visible", timeout=5_000)
    assert editor.input_value() == broken
    editor.fill(json.dumps(rows))
    page.locator(".graphdialog button").click()
    assert json.loads(rows_value(page)) == rows
    assert widget(page, STACK, "lora 1")["value"] == lora_names["example_lora"]
    assert "rows error" not in [w["name"] for w in widgets(page, STACK)]


def test_empty_loras_folder_shows_a_hint_until_refreshed(page, comfy_server, lora_names):
    load(page, lora_workflow([]), (STACK,))
    assert "no LoRA files" not in [w["name"] for w in widgets(page, STACK)]
    # The server's LoRA folders (models/loras and the FluxWorks-only one with the embedded LoRA) are shared with
    # other tests, so the empty listing is what the page is told.
    page.route("**/api/models/*loras", lambda route: route.fulfill(status=200, json=[]))
    try:
        page.mouse.click(800, 900)  # focus the canvas (empty area), then R refreshes as the hint says
        page.keyboard.press("r")
        page.wait_for_function(f"() => ({FIND})('{STACK}').widgets.some(w => w.name === 'no LoRA files')",
                               timeout=10_000)
    finally:
        page.unroute("**/api/models/*loras")
    hint = widget(page, STACK, "no LoRA files")
    assert "models/loras" in hint["note"] and "press R" in hint["note"]
    assert widget(page, STACK, "+ add LoRA")["disabled"]
    node_screenshot(page, [STACK], os.path.join(ARTIFACTS, "widgets_lora_empty_hint.png"))

    page.keyboard.press("r")
    page.wait_for_function(f"() => !({FIND})('{STACK}').widgets.some(w => w.name === 'no LoRA files')",
                           timeout=10_000)
    assert not widget(page, STACK, "+ add LoRA")["disabled"]
    click_widget(page, STACK, "+ add LoRA", "middle")
    page.wait_for_function(f"() => ({FIND})('{STACK}').widgets.some(w => w.name === 'lora 1')", timeout=10_000)
    [row] = json.loads(rows_value(page))
    listed = comfy_server.get_json("/models/loras")
    assert lora_names["example_lora"] in listed
    assert row == {"lora": listed[0], "strength": 1.0, "enabled": True}  # a new row takes the first file


def test_apply_report_wraps_between_words(page, lora_names):
    load(page, lora_workflow([]), (APPLY,))
    report = (f"{LONG_NAME} @ 0.85: kohya; 1234 weights patched; 2 keys not applied: "
              "lora_unet_double_blocks_12_img_attn_proj.lora_down.weight (shape 4x256 does not fit 3072x3072), "
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha (no text encoder connected)\n"
              f"{lora_names['example_lokr']} @ -0.5: kohya LoKr; 96 weights patched")
    evaluate_on(page, APPLY, f"(node) => {{ node.onExecuted({{text: [{json.dumps(report)}]}}); return null; }}")
    page.wait_for_timeout(200)
    lines = evaluate_on(page, APPLY, "(node) => node.fluxworksReportLines")
    assert len(lines) > 3  # the node is narrower than the report
    # Lines break where the report has a space or a line break: no number, name or key is cut, except a word
    # longer than a whole line (monospace: by characters), which breaks after one of its "_", ".", "/", "-".
    longest = max(len(line) for line in lines)
    whole = {word for line in lines for word in line.split()}
    cut_words = [word for word in report.split() if word not in whole]
    assert cut_words == [LONG_NAME] and len(LONG_NAME) > longest, (cut_words, lines)
    assert {"0.85:", "1234", "4x256", "3072x3072),", "-0.5:", "96"} <= whole
    cut = [line for line in lines if LONG_NAME.startswith(line)]
    assert cut and cut[0][-1] in "_.-/", lines  # the 67-character name is broken after a separator
    assert "".join(lines).replace(" ", "") == report.replace("\n", "").replace(" ", "")
    node_screenshot(page, [APPLY], os.path.join(ARTIFACTS, "widgets_apply_report.png"))


# --- guidance curve and sampler -------------------------------------------------------------------------------

def test_guidance_curve_has_axes_step_marks_and_says_when_true_cfg_is_off(page, comfy_server, object_info):
    workflow = schedule_workflow(comfy_server, object_info, cfg_scale=3.0, cfg_end_percent=0.6)
    workflow = set_values(workflow, SAMPLER, {"steps": 20}, object_info)
    load(page, workflow, (SCHEDULE, SAMPLER))
    drawn = curve(page)
    [schedule] = [n for n in workflow["nodes"] if n["type"] == SCHEDULE]
    python = GuidanceCurve(**widget_values(schedule, object_info[SCHEDULE]))

    # Axes: the sampler's 20 steps (labels 1, middle, 20) and the guidance value.
    assert drawn["steps"] == 20 and drawn["axes"]["x"]["title"] == "step (of 20)"
    ticks = drawn["axes"]["x"]["ticks"]
    assert [t["p"] for t in ticks] == pytest.approx([i / 19 for i in range(20)], abs=1e-12)
    assert [t["label"] for t in ticks if t["label"]] == ["1", "11", "20"]
    assert drawn["axes"]["y"]["title"] == "guidance"
    lo, hi = drawn["yRange"]
    assert all(lo <= t["v"] <= hi for t in drawn["axes"]["y"]["ticks"]) and len(drawn["axes"]["y"]["ticks"]) >= 2
    # A mark on the curve per step, at the value that step gets (flux_sampler.guidance, step i at i / (n - 1)).
    marks = np.array(drawn["stepMarks"])
    assert marks.shape == (20, 2)
    assert np.allclose(marks[:, 1], python.values(20), rtol=0, atol=1e-6)

    # No negative on the sampler: the window is shaded but labelled off, as the sampler will run it (not at all).
    assert drawn["cfgWindow"] == [0.0, 0.6]
    assert drawn["cfg"]["state"] == "off" and drawn["cfgLabel"] == "CFG 3.0 off: no negative connected"

    # On screen: the axis lines and the step marks are where the recorded geometry says.
    pixels = page_pixels(page, "widgets_curve_axes.png")
    plot = drawn["plot"]
    bottom = plot["y"] + plot["h"]
    for fraction in (0.1, 0.5, 0.9):
        assert near(pixels, *css_point(page, SCHEDULE, plot["x"] + fraction * plot["w"], bottom), AXIS_RGB)
        assert near(pixels, *css_point(page, SCHEDULE, plot["x"], plot["y"] + fraction * plot["h"]), AXIS_RGB)
    to_y = lambda v: plot["y"] + plot["h"] - (v - lo) / (hi - lo) * plot["h"]  # noqa: E731
    missing = [(p, v) for p, v in marks[::3]  # rings of radius 3.5 around each step's point
               if not near(pixels, *css_point(page, SCHEDULE, plot["x"] + p * plot["w"], to_y(v)), STEP_RGB, 4, 40)]
    assert not missing, f"step marks not drawn at (progress, value) {missing}"
    node_screenshot(page, [SCHEDULE, SAMPLER], os.path.join(DOCS_IMG, "sampler_with_schedule.png"))

    # A person connects a negative prompt: true CFG will run, and the label says so.
    page.evaluate(f"""() => {{ const encode = ({FIND})('FluxWorksTextEncode');
        encode.connect(0, ({FIND})('{SAMPLER}'), 'negative'); app.canvas.setDirty(true, true); }}""")
    page.wait_for_timeout(200)
    drawn = curve(page)
    assert drawn["cfg"]["state"] == "on" and drawn["cfgLabel"] == "CFG 3.0"
    node_screenshot(page, [SCHEDULE], os.path.join(DOCS_IMG, "guidance_curve.png"))

    # Unlinked from the sampler, the curve no longer knows a step count: progress in percent.
    page.evaluate(f"""() => {{ const s = ({FIND})('{SAMPLER}');
        s.disconnectInput(s.inputs.findIndex(i => i.name === 'guidance_schedule')); app.canvas.setDirty(true, true); }}""")
    page.wait_for_timeout(200)
    drawn = curve(page)
    assert drawn["steps"] is None and drawn["cfg"]["state"] == "unknown" and drawn["cfgLabel"] == "CFG 3.0"
    assert [(t["p"], t["label"]) for t in drawn["axes"]["x"]["ticks"]] == \
        [(0, "0%"), (0.25, "25%"), (0.5, "50%"), (0.75, "75%"), (1, "100%")]
    assert drawn["axes"]["x"]["title"] == "progress"

    # Feeding only a core MODEL (FluxWorks Schedule Core Model), the schedule's cfg_scale is not read at all.
    page.evaluate(f"""() => {{ const core = LiteGraph.createNode('FluxWorksScheduleCoreModel');
        core.pos = [40, 40]; app.graph.add(core); ({FIND})('{SCHEDULE}').connect(0, core, 'guidance_schedule');
        app.canvas.setDirty(true, true); }}""")
    page.wait_for_timeout(200)
    drawn = curve(page)
    assert drawn["cfg"]["state"] == "off" and drawn["cfgLabel"] == "CFG 3.0 off: core samplers use their own cfg"


def test_sampler_guidance_widget_is_greyed_while_a_schedule_is_linked(page, comfy_server, object_info):
    load(page, schedule_workflow(comfy_server, object_info), (SCHEDULE, SAMPLER))
    guidance = widget(page, SAMPLER, "guidance")
    assert guidance["disabled"] and guidance["label"] == "guidance: set by the schedule"
    assert "guidance_schedule" in guidance["tooltip"]
    # A person clicks its arrow: nothing changes (the frontend ignores disabled widgets).
    click_widget(page, SAMPLER, "guidance", "right")
    assert widget(page, SAMPLER, "guidance")["value"] == 3.5
    assert queued_inputs(page, SAMPLER)["guidance"] == 3.5  # still saved and queued: the sampler ignores it

    # Disconnected, the widget is live again under its own name.
    page.evaluate(f"""() => {{ const s = ({FIND})('{SAMPLER}');
        s.disconnectInput(s.inputs.findIndex(i => i.name === 'guidance_schedule')); }}""")
    guidance = widget(page, SAMPLER, "guidance")
    assert not guidance["disabled"] and guidance["label"] in (None, "guidance")  # the frontend's own label
    click_widget(page, SAMPLER, "guidance", "right")
    assert widget(page, SAMPLER, "guidance")["value"] > 3.5

    # Connected again (as by dragging the link), greyed again.
    page.evaluate(f"""() => ({FIND})('{SCHEDULE}').connect(0, ({FIND})('{SAMPLER}'), 'guidance_schedule')""")
    assert widget(page, SAMPLER, "guidance")["disabled"]


def test_text_encode_states_the_embedded_model_grammar(object_info):
    """The node's description and prompt tooltip give the embedded model's grammar; their examples parse."""
    info = object_info["FluxWorksTextEncode"]
    tooltip = info["input"]["required"]["prompt"][1]["tooltip"]
    for text in (info["description"], tooltip):
        assert "embedded demo model" in text and "<colour> <shape> <position>" in text
        examples = [part for part in text.split('"') if part.endswith(" background") and part.startswith("a ")]
        assert len(examples) == 2, examples
        for example in examples:
            assert parse_caption(example).caption() == example
