"""`make demo`: generate an image with the embedded model through a real ComfyUI server.

Starts ComfyUI on 127.0.0.1 with this pack, queues the embedded text-to-image example exactly as shipped
(example_workflows/api/embedded_text_to_image.json: the embedded model's files and recommended settings) over
`POST /prompt`, with its UI workflow as the frontend sends it, follows progress on the websocket, downloads the
PNG through `/view` as SaveImage wrote it (with the "prompt" and "workflow" text chunks, so dropping it on the
ComfyUI canvas gives the graph back), saves it and prints its path, then stops the server.
docs/demo.png is this picture: `python -m devtools.demo --out docs/demo.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from devtools.comfy_server import ComfyServer
from devtools.paths import REPO

EXAMPLE = "embedded_text_to_image"
UI_WORKFLOW = os.path.join(REPO, "example_workflows", EXAMPLE + ".json")
API_WORKFLOW = os.path.join(REPO, "example_workflows", "api", EXAMPLE + ".json")
DEFAULT_OUT = os.path.join(REPO, "output", "fluxworks_demo.png")

logger = logging.getLogger("fluxworks.demo")


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_demo(server: ComfyServer, path: str) -> str:
    """Run the example on a started `server` and write its PNG, text chunks included, to `path`."""
    prompt, workflow = _read(API_WORKFLOW), _read(UI_WORKFLOW)

    def on_message(_server, message: dict) -> None:
        if message["type"] == "progress":
            logger.info("  step %d/%d", message["data"]["value"], message["data"]["max"])

    logger.info("queueing %s", os.path.relpath(API_WORKFLOW, REPO))
    result = server.run(prompt, on_message=on_message, extra_data={"extra_pnginfo": {"workflow": workflow}})
    if result.status != "success":
        errors = [m["data"] for m in result.messages if m["type"] == "execution_error"]
        raise RuntimeError(f"the demo prompt failed ({result.status}): {errors}\n{server.log()[-3000:]}")
    [save] = [k for k, n in prompt.items() if n["class_type"] == "SaveImage"]
    [file] = result.outputs[save]["images"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(server.view(file))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to save the PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = tempfile.mkdtemp(prefix="fluxworks-demo-")
    server = ComfyServer(root)
    started = time.perf_counter()
    try:
        logger.info("starting ComfyUI (CPU) ...")
        server.start()
        path = write_demo(server, args.out)
        logger.info("saved %s in %.0f s", path, time.perf_counter() - started)
        print(path)  # noqa: T201 - the demo's one result, for scripts
        return 0
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
