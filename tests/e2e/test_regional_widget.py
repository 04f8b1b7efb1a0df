"""Headless Chromium on the ComfyUI page: the FluxWorks Regional Prompt widget (js/regional_prompt.js) as a person
uses it, on the embedded-only server. The example embedded_regional_prompt is loaded, a region is drawn with the
mouse, moved and resized, its prompt typed, and the workflow is queued from the page; the queued `regions` JSON
holds the drawn rectangle and the server draws the new shape inside it. A picture connected to `image` is shown
under the rectangles. Uses the system Chromium (Debian package `chromium`) through PyPI playwright; nothing is
downloaded. Writes docs/img/regional_prompt.png (the README and docs/regional.md show it).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from evaluation.regional import inside
from tests.e2e.test_widgets import CHROMIUM, CHROMIUM_ARGS, DOCS_IMG, DPR, css_point, evaluate_on, load, node_screenshot
from tests.e2e.test_widgets import widgets as widget_list
from tests.e2e.ui_workflows import copy_example_inputs, load_ui

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

NODE = "FluxWorksRegionalPrompt"
EXAMPLE = "embedded_regional_prompt"
NEW_PROMPT = "a large green triangle at the bottom, on a yellow background"  # the embedded model's grammar


@pytest.fixture(scope="module")
def page(embedded_server):
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    copy_example_inputs(embedded_server.input_dir)
    first_visit = not embedded_server.get_json("/settings").get("Comfy.TutorialCompleted")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # tall enough for the node with a third row's widgets: the mouse only reaches what is on the page
        page = browser.new_page(viewport={"width": 1600, "height": 1500}, device_scale_factor=DPR)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(embedded_server.url)
        page.wait_for_function("window.app?.graph && window.app.extensions?.some(e => e.name === "
                               "'FluxWorks.RegionalPrompt')", timeout=60_000)
        if first_visit:
            dialog = page.locator("[role=dialog]")
            dialog.wait_for(state="visible", timeout=30_000)
            dialog.locator("button:has(i.pi-times)").click()
            dialog.wait_for(state="hidden", timeout=10_000)
        yield page
        browser.close()
    ours = [e for e in errors if "fluxworks" in e.lower() or "regional_prompt" in e]
    assert not ours, ours


def regions(page) -> list[dict]:
    return json.loads(evaluate_on(page, NODE, "(node) => node.widgets.find(w => w.name === 'regions').value"))


def drawn(page) -> dict:
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(200)
    return evaluate_on(page, NODE, "(node) => node.fluxworksRegions")


def frame_point(page, fx: float, fy: float) -> tuple[float, float]:
    """CSS pixels of the point at image fractions (fx, fy) of the widget's frame."""
    frame = drawn(page)["frame"]
    return css_point(page, NODE, frame["x"] + fx * frame["w"], frame["y"] + fy * frame["h"])


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press at `start`, move to `end`, release (image fractions). Waits out LiteGraph's 300 ms double-click window
    first: a press soon after the last one on the same node is a double click."""
    page.wait_for_timeout(400)
    page.mouse.move(*frame_point(page, *start))
    page.mouse.down()
    page.mouse.move(*frame_point(page, *end), steps=6)
    page.mouse.up()
    page.mouse.move(5, 990)
    page.wait_for_timeout(150)


def close(box: dict, expected: dict, tol: float = 0.012) -> bool:
    return all(abs(box[k] - expected[k]) <= tol for k in ("x", "y", "w", "h"))


def test_draw_move_resize_a_region_and_queue_it(page, embedded_server):
    load(page, load_ui(EXAMPLE), (NODE,))
    shipped = json.loads(load_ui(EXAMPLE)["nodes"][[n["type"] for n in load_ui(EXAMPLE)["nodes"]].index(NODE)]
                         ["widgets_values"][0])
    assert regions(page) == shipped

    # The JSON is hidden; each row has its widgets; each row is drawn where its JSON says.
    names = {w["name"]: w for w in widget_list(page, NODE)}
    assert names["regions"]["hidden"] and not names["regions"]["visible"]
    for i in (1, 2):
        assert {f"region {i}", f"prompt {i}", f"strength {i}", f"remove region {i}"} <= set(names)
        assert names[f"prompt {i}"]["value"] == shipped[i - 1]["prompt"]
    state = drawn(page)
    assert not state["error"] and [r["row"] for r in state["rows"]] == [0, 1]
    for row, shown in zip(shipped, state["rows"], strict=True):
        assert close(shown["box"], row, 1e-6)

    # Draw a new region at the bottom middle cell, then move it and resize it by its bottom right corner.
    drag(page, (0.36, 0.70), (0.64, 0.97))
    rows = regions(page)
    assert len(rows) == 3 and rows[2]["prompt"] == "" and rows[2]["on"] is True
    assert close(rows[2], {"x": 0.36, "y": 0.70, "w": 0.28, "h": 0.27}), rows[2]
    drag(page, (0.5, 0.8), (0.45, 0.75))  # inside: moves by (-0.05, -0.05)
    assert close(regions(page)[2], {"x": 0.31, "y": 0.65, "w": 0.28, "h": 0.27}), regions(page)[2]
    box = regions(page)[2]
    drag(page, (box["x"] + box["w"], box["y"] + box["h"]), (0.68, 1.0))  # the corner: resizes
    rows = regions(page)
    assert close(rows[2], {"x": 0.31, "y": 0.65, "w": 0.37, "h": 0.35}), rows[2]
    assert [r["prompt"] for r in rows[:2]] == [r["prompt"] for r in shipped]  # the others are untouched
    assert len(drawn(page)["rows"]) == 3
    node_screenshot(page, [NODE], os.path.join(DOCS_IMG, "regional_prompt.png"))

    # Type the new region's prompt (the text widget's callback, as its dialog calls it) and queue from the page.
    evaluate_on(page, NODE, f"""(node) => {{ const w = node.widgets.find(w => w.name === 'prompt 3');
        w.value = {json.dumps(NEW_PROMPT)}; w.callback?.(w.value, app.canvas, node); return null; }}""")
    assert regions(page)[2]["prompt"] == NEW_PROMPT
    queued = page.evaluate("async () => (await app.graphToPrompt()).output")
    [node] = [n for n in queued.values() if n["class_type"] == NODE]
    assert json.loads(node["inputs"]["regions"]) == regions(page)
    before = set(embedded_server.get_json("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline:
        new = {k: v for k, v in embedded_server.get_json("/history").items() if k not in before}
        if new and all(v.get("status", {}).get("completed") or v.get("status", {}).get("status_str") == "error"
                       for v in new.values()):
            [entry] = new.values()
            break
        time.sleep(0.5)
    assert entry is not None, "the queued prompt did not finish"
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = [embedded_server.view_image(f) for out in entry["outputs"].values() for f in out.get("images", [])]
    from evaluation.adherence import detect

    _, objects = detect(np.asarray(image.convert("RGB")))
    greens = [o.centroid for o in objects.get("green", [])]
    drawn_box = rows[2]
    assert any(drawn_box["x"] * 128 <= x < (drawn_box["x"] + drawn_box["w"]) * 128
               and drawn_box["y"] * 128 <= y < (drawn_box["y"] + drawn_box["h"]) * 128 for x, y in greens), greens
    assert inside(objects["red"][0].centroid, "left")


def test_a_connected_picture_is_shown_under_the_rectangles(page):
    load(page, load_ui(EXAMPLE), (NODE,))
    page.evaluate(f"""() => {{
      const node = app.graph.nodes.find(n => n.type === '{NODE}');
      const image = LiteGraph.createNode('LoadImage');
      image.pos = [node.pos[0] - 360, node.pos[1]];
      app.graph.add(image);
      const w = image.widgets.find(w => w.name === 'image');
      w.value = 'example.png';
      w.callback?.(w.value);
      image.connect(0, node, node.inputs.findIndex(i => i.name === 'image'));
    }}""")
    page.wait_for_function("() => app.graph.nodes.find(n => n.type === 'LoadImage')?.imgs?.[0]?.naturalWidth > 0",
                           timeout=30_000)
    state = drawn(page)
    assert state["image"]
    size = page.evaluate("() => { const i = app.graph.nodes.find(n => n.type === 'LoadImage').imgs[0];"
                         " return [i.naturalWidth, i.naturalHeight]; }")
    frame = state["frame"]
    assert abs(frame["w"] / frame["h"] - size[0] / size[1]) < 0.02  # the frame takes the picture's shape
    assert len(state["rows"]) == 2
