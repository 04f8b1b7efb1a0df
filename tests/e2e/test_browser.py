"""Headless Chromium on the ComfyUI page: drop the UI-format example, queue it, see the image and the guidance curve;
and, on a server with only the embedded model, pick every embedded-model template in the Templates browser and run it.

Uses the system Chromium (Debian package `chromium`) through PyPI playwright; nothing is downloaded at test time.
Screenshots go to test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from devtools.comfy_server import remove_trained_files
from fluxworks.flux_sampler.guidance import GuidanceCurve
from tests.e2e.ui_workflows import (
    copy_example_inputs,
    load_api,
    load_ui,
    set_values,
    widget_values,
    with_model_names,
    workflow_names,
)
from tests.e2e.workflows import EMBEDDED_PREFIX
from tests.paths import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = os.path.join(REPO, "test-artifacts")
EXAMPLE = "flux_dev_text_to_image"
SCHEDULE = "FluxWorksGuidanceSchedule"
CURVE_RGB = (127, 208, 255)  # CURVE_COLOR in js/guidance_curve.js
SIZE, STEPS = (64, 48), 3

FIND_SCHEDULE = f"app.graph.nodes.find(n => n.type === '{SCHEDULE}')"
# Node-local plot geometry -> page pixels, through the canvas transform (device pixel ratio 1).
SCREEN_GEOMETRY = f"""() => {{
  const node = {FIND_SCHEDULE};
  const rect = app.canvas.canvas.getBoundingClientRect();
  const ds = app.canvas.ds;
  return {{pos: [...node.pos], size: [...node.size], scale: ds.scale, offset: [...ds.offset],
          canvas: [rect.left, rect.top], dpr: window.devicePixelRatio}};
}}"""


@pytest.fixture(scope="module")
def playwright():
    """One Playwright driver for the module: its sync API runs an event loop, so two at once in one thread fail."""
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@contextlib.contextmanager
def browser_page(playwright, server):
    """The ComfyUI page of `server` in headless Chromium, ready to use; fails on errors from our extensions."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    first_visit = not server.get_json("/settings").get("Comfy.TutorialCompleted")
    started = time.monotonic()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}"))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(server.url)
    page.wait_for_function("window.app?.graph && window.app.extensions?.some("
                           "e => e.name === 'FluxWorks.GuidanceCurve')", timeout=60_000)
    if first_visit:  # a new user gets the Templates browser over an empty graph: close it as a person would
        dialog = page.locator("[role=dialog]")
        dialog.wait_for(state="visible", timeout=30_000)
        dialog.locator("button:has(i.pi-times)").click()  # the dialog's close (X) button
        dialog.wait_for(state="hidden", timeout=10_000)
    logger.info("ComfyUI page ready in %.1fs", time.monotonic() - started)
    try:
        yield page
    finally:
        browser.close()
    ours = [e for e in errors if "guidance_curve" in e or "fluxworks" in e.lower()]
    assert not ours, ours


@pytest.fixture(scope="module")
def page(playwright, comfy_server):
    copy_example_inputs(comfy_server.input_dir)
    with browser_page(playwright, comfy_server) as page:
        yield page


@pytest.fixture(scope="module")
def embedded_page(playwright, embedded_server):
    """The page of a server with no model files but the pack's embedded ones, as a new user has it."""
    with browser_page(playwright, embedded_server) as page:
        yield page


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


def drop_json(page, file_name: str, workflow: dict) -> None:
    """Drop a JSON file on the graph canvas the way a file dragged from the desktop arrives."""
    data = page.evaluate_handle(
        """([name, text]) => {
             const dt = new DataTransfer();
             dt.items.add(new File([text], name, {type: "application/json"}));
             return dt;
           }""", [file_name, json.dumps(workflow)])
    canvas = page.locator("#graph-canvas")
    for event in ("dragenter", "dragover", "drop"):
        canvas.dispatch_event(event, {"dataTransfer": data})


def schedule_curve(page) -> dict:
    return page.evaluate(f"() => {{ const c = {FIND_SCHEDULE}.fluxworksCurve; return JSON.parse(JSON.stringify(c)); }}")


def wait_for_curve(page, **settings) -> dict:
    checks = " && ".join(f"c.settings.{k} === {json.dumps(v)}" for k, v in settings.items()) or "true"
    page.wait_for_function(f"() => {{ const c = {FIND_SCHEDULE}?.fluxworksCurve; return c?.yRange && {checks}; }}",
                           timeout=10_000)
    return schedule_curve(page)


def assert_matches_python(curve: dict) -> None:
    """The drawn samples are GuidanceCurve.values at the same points, and the shaded window its CFG window."""
    python = GuidanceCurve(**curve["settings"])
    assert np.allclose(curve["values"], python.values(len(curve["values"])), rtol=0, atol=1e-6)
    expected_window = [python.cfg_start_percent, python.cfg_end_percent] if python.cfg_scale != 1.0 else None
    assert curve["cfgWindow"] == expected_window


def screen_point(geometry: dict, x: float, y: float) -> tuple[int, int]:
    """Node-local canvas units -> screenshot pixels."""
    s, (ox, oy), (cx, cy) = geometry["scale"], geometry["offset"], geometry["canvas"]
    px = cx + (geometry["pos"][0] + x + ox) * s
    py = cy + (geometry["pos"][1] + y + oy) * s
    return round(px * geometry["dpr"]), round(py * geometry["dpr"])


def near(pixels: np.ndarray, x: int, y: int, rgb: tuple[int, int, int], radius: int = 3, tol: int = 60) -> bool:
    window = pixels[y - radius:y + radius + 1, x - radius:x + radius + 1, :3].astype(int)
    return bool((np.abs(window - np.array(rgb)).sum(axis=-1) < tol).any())


def assert_curve_on_screen(page, curve: dict, path: str) -> np.ndarray:
    """The screenshot shows the curve's line where its samples map to, and the plot is not just background."""
    page.screenshot(path=path)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    geometry = page.evaluate(SCREEN_GEOMETRY)
    plot, (lo, hi) = curve["plot"], curve["yRange"]
    left, top = screen_point(geometry, plot["x"], plot["y"])
    right, bottom = screen_point(geometry, plot["x"] + plot["w"], plot["y"] + plot["h"])
    assert 0 <= left < right <= pixels.shape[1] and 0 <= top < bottom <= pixels.shape[0], "plot is off screen"
    area = pixels[top:bottom, left:right].reshape(-1, 3)
    assert len(np.unique(area, axis=0)) > 10, "the plot area is plain background"
    missing = []
    for i in range(0, len(curve["values"]), 10):
        x = plot["x"] + curve["progress"][i] * plot["w"]
        y = plot["y"] + plot["h"] - (curve["values"][i] - lo) / (hi - lo) * plot["h"]
        if not near(pixels, *screen_point(geometry, x, y), CURVE_RGB):
            missing.append((curve["progress"][i], curve["values"][i]))
    assert not missing, f"curve not drawn at (progress, value) {missing}; see {path}"
    return pixels


def test_dropped_example_runs_and_draws_its_guidance_curve(page, comfy_server, object_info):
    workflow = with_model_names(load_ui(EXAMPLE), comfy_server.model_names)
    workflow = set_values(workflow, "EmptySD3LatentImage", {"width": SIZE[0], "height": SIZE[1]}, object_info)
    workflow = set_values(workflow, "FluxWorksSampler", {"steps": STEPS}, object_info)
    drop_json(page, EXAMPLE + ".json", workflow)
    page.wait_for_function(f"() => app.graph.nodes.length === {len(workflow['nodes'])} && {FIND_SCHEDULE}",
                           timeout=20_000)

    # What the frontend will queue is the API copy, with the same edits.
    expected = set_values(with_model_names(load_api(EXAMPLE), comfy_server.model_names), "EmptySD3LatentImage",
                          {"width": SIZE[0], "height": SIZE[1]})
    expected = set_values(expected, "FluxWorksSampler", {"steps": STEPS})
    assert page.evaluate("async () => (await app.graphToPrompt()).output") == expected

    [schedule] = [n for n in workflow["nodes"] if n["type"] == SCHEDULE]
    curve = wait_for_curve(page, **widget_values(schedule, object_info[SCHEDULE]))
    assert curve["settings"]["shape"] == "cosine" and curve["values"][0] > curve["values"][-1]
    assert_matches_python(curve)
    assert_curve_on_screen(page, curve, os.path.join(ARTIFACTS, "browser_workflow_loaded.png"))

    page.locator("[data-testid=queue-button] button[aria-label=Run]").click()
    [save] = [str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"]
    page.wait_for_function(
        f"""() => {{
          const node = app.graph.getNodeById({save});
          return app.nodeOutputs?.["{save}"]?.images?.length && node.imgs?.[0]?.complete && node.imgs[0].naturalWidth;
        }}""", timeout=120_000)
    shown = page.evaluate(f"() => {{ const i = app.graph.getNodeById({save}).imgs[0]; "
                          "return [i.naturalWidth, i.naturalHeight]; }")
    assert tuple(shown) == SIZE
    [image_ref] = page.evaluate(f"() => app.nodeOutputs['{save}'].images")
    image = np.asarray(comfy_server.view_image(image_ref))
    assert image.shape[:2] == (SIZE[1], SIZE[0]) and image.std() > 1.0
    page.wait_for_timeout(300)  # let the canvas paint the image into the Save Image node
    assert_curve_on_screen(page, curve, os.path.join(ARTIFACTS, "browser_workflow.png"))

    # A person clicks the right arrow of the shape combo: cosine -> exponential, and the plot follows.
    geometry = page.evaluate(SCREEN_GEOMETRY)
    widget_y = page.evaluate(f"() => {{ const w = {FIND_SCHEDULE}.widgets.find(w => w.name === 'shape'); "
                             "return w.y + w.computedHeight / 2; }")
    page.mouse.click(*screen_point(geometry, geometry["size"][0] - 22, widget_y))
    page.mouse.move(10, geometry["canvas"][1] + 5)  # off the node, so no tooltip covers the plot
    changed = wait_for_curve(page, shape="exponential")
    assert_matches_python(changed)
    assert not np.allclose(changed["values"], curve["values"])
    assert_curve_on_screen(page, changed, os.path.join(ARTIFACTS, "browser_curve_shape_changed.png"))

    # A widget changed through the widget API (as another extension would) redraws too: true CFG gets shaded.
    page.evaluate(f"""() => {{
      const node = {FIND_SCHEDULE};
      for (const [name, value] of [["cfg_end_percent", 0.5], ["cfg_scale", 3.0]]) {{
        const w = node.widgets.find(w => w.name === name);
        w.value = value;
        w.callback?.(value, app.canvas, node);
      }}
    }}""")
    shaded = wait_for_curve(page, shape="exponential", cfg_scale=3.0, cfg_end_percent=0.5)
    assert_matches_python(shaded)
    assert shaded["cfgWindow"] == [0.0, 0.5]
    pixels = assert_curve_on_screen(page, shaded, os.path.join(ARTIFACTS, "browser_curve_cfg_window.png"))
    geometry = page.evaluate(SCREEN_GEOMETRY)
    plot = shaded["plot"]
    inside = screen_point(geometry, plot["x"] + 0.25 * plot["w"], plot["y"] + plot["h"] * 0.5)
    outside = screen_point(geometry, plot["x"] + 0.75 * plot["w"], plot["y"] + plot["h"] * 0.5)
    def redness(x: int, y: int) -> float:
        box = pixels[y - 3:y + 4, x - 3:x + 4].astype(float)
        return float((box[..., 0] - box[..., 2]).mean())

    assert redness(*inside) > redness(*outside) + 20  # the orange CFG shade covers the window only


@pytest.mark.parametrize("name", workflow_names())
def test_frontend_queues_exactly_the_api_copy(page, name):
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", load_ui(name))
    assert page.evaluate("async () => (await app.graphToPrompt()).output") == load_api(name)


def open_templates_browser(page):
    """The Templates browser, opened from the sidebar as a person would (unless it is already open)."""
    dialog = page.locator("[role=dialog]")
    if not dialog.is_visible():
        page.locator("button.templates-tab-button").click()
    dialog.wait_for(state="visible", timeout=30_000)
    return dialog


@pytest.mark.parametrize("name", sorted(n for n in workflow_names() if n.startswith(EMBEDDED_PREFIX)))
def test_embedded_template_runs_from_the_templates_browser_with_no_edit(embedded_page, embedded_server, name):
    """A new user's first run: on a server with only the embedded model, pick the template under Templates ->
    Extensions -> the pack, press Run, get the picture, and the PNG carries the workflow."""
    page = embedded_page
    [pack] = [p for p, names in embedded_server.get_json("/workflow_templates").items() if name in names]
    workflow = load_ui(name)
    [save] = [n for n in workflow["nodes"] if n["type"] == "SaveImage"]
    prefix = save["widgets_values"][0]
    dialog = open_templates_browser(page)
    dialog.get_by_role("button", name=pack, exact=True).click()  # Extensions -> the pack's folder name
    dialog.locator(f"[data-testid='template-workflow-{name}']").click()
    dialog.wait_for(state="hidden", timeout=30_000)
    page.wait_for_function(f"() => app.graph.nodes.length === {len(workflow['nodes'])} && app.graph.nodes.some("
                           f"n => n.type === 'SaveImage' && n.widgets?.[0]?.value === {json.dumps(prefix)})",
                           timeout=30_000)
    assert page.evaluate("async () => (await app.graphToPrompt()).output") == load_api(name)  # nothing edited

    page.locator("[data-testid=queue-button] button[aria-label=Run]").click()
    page.wait_for_function(
        f"""() => {{
          const node = app.graph.getNodeById({save['id']});
          return app.nodeOutputs?.["{save['id']}"]?.images?.length && node.imgs?.[0]?.complete && node.imgs[0].naturalWidth;
        }}""", timeout=300_000)
    page.screenshot(path=os.path.join(ARTIFACTS, f"template_{name}.png"))
    for entry in embedded_server.get_json("/history").values():  # the training template's LoRA
        remove_trained_files(entry["outputs"], [n["id"] for n in workflow["nodes"] if n["type"] == "FluxWorksTrainLora"])
    [image_ref] = page.evaluate(f"() => app.nodeOutputs['{save['id']}'].images")
    png = Image.open(io.BytesIO(embedded_server.view(image_ref)))
    assert png.size == (128, 128) and np.asarray(png.convert("RGB")).std() > 10.0
    saved = json.loads(png.info["workflow"])  # what SaveImage stored: the graph as the frontend had it
    assert sorted((n["id"], n["type"]) for n in saved["nodes"]) == sorted((n["id"], n["type"]) for n in workflow["nodes"])
    assert json.loads(png.info["prompt"]) == load_api(name)
