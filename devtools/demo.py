"""`make demo`: generate an image with the embedded model through a real ComfyUI server.

Starts ComfyUI on 127.0.0.1 with this pack, queues the text-to-image example workflow (API format) over
`POST /prompt` with the embedded model's files and recommended settings, follows progress on the websocket,
downloads the PNG through `/view`, saves it under output/ and prints its path, then stops the server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time

from devtools.comfy_server import ComfyServer
from evaluation.embedded import DEMO_PROMPT, IMAGE_SIZE, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, RECOMMENDED_T5_LENGTH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(REPO, "example_workflows", "api", "flux_dev_text_to_image.json")
PROMPT = DEMO_PROMPT
# The embedded model's files (registered by the pack) and the settings it was trained for.
EMBEDDED = {"FluxWorksModelLoader": {"model_name": "flux1-shapes-tiny.safetensors"},
            "FluxWorksTextEncoderLoader": {"t5_name": "t5xxl_shapes_tiny.safetensors",
                                           "clip_name": "clip_l_shapes_tiny.safetensors"},
            "VAELoader": {"vae_name": "taef1_shapes_tiny.safetensors"},
            "EmptySD3LatentImage": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1},
            "FluxWorksTextEncode": {"prompt": PROMPT, "max_sequence_length": str(RECOMMENDED_T5_LENGTH)},
            "FluxWorksGuidanceSchedule": {"start_value": RECOMMENDED_GUIDANCE, "end_value": RECOMMENDED_GUIDANCE,
                                          "shape": "constant"},
            "FluxWorksSampler": {"steps": RECOMMENDED_STEPS, "seed": 7},
            "SaveImage": {"filename_prefix": "fluxworks_demo"}}

logger = logging.getLogger("fluxworks.demo")


def demo_prompt() -> dict:
    with open(WORKFLOW, encoding="utf-8") as f:
        prompt = json.load(f)
    for node in prompt.values():
        node["inputs"].update(EMBEDDED.get(node["class_type"], {}))
    return prompt


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = tempfile.mkdtemp(prefix="fluxworks-demo-")
    server = ComfyServer(root)
    started = time.perf_counter()
    try:
        logger.info("starting ComfyUI (CPU) ...")
        server.start()
        logger.info("queueing %s", os.path.relpath(WORKFLOW, REPO))

        def on_message(_server, message: dict) -> None:
            if message["type"] == "progress":
                logger.info("  step %d/%d", message["data"]["value"], message["data"]["max"])

        result = server.run(demo_prompt(), on_message=on_message)
        if result.status != "success":
            logger.error("the prompt failed: %s\n%s", result.status, server.log()[-3000:])
            return 1
        [image] = server.images(result)
        os.makedirs(os.path.join(REPO, "output"), exist_ok=True)
        path = os.path.join(REPO, "output", "fluxworks_demo.png")
        image.save(path)
        logger.info("saved %s (%dx%d) in %.0f s", path, image.width, image.height, time.perf_counter() - started)
        print(path)  # noqa: T201 - the demo's one result, for scripts
        return 0
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
