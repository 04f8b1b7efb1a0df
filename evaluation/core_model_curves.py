"""Guidance curves for the embedded_core_model_scheduled_guidance example: the embedded model through FluxWorks
Load Core Model -> FluxWorks Schedule Core Model -> core KSampler (euler, simple, cfg 1, core's default FLUX.1
sigma shift), on validation captions, scored by the adherence evaluator. The example's graph is queued as
shipped on a real ComfyUI with only the embedded model; only the caption, seed and curve change per run.

    PYTHONPATH=. python -m evaluation.core_model_curves --captions 20 --json docs/bench/embedded_core_model_curves.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import numpy as np

from devtools.embedded_examples import build_twin, embedded_only_server
from devtools.workflow_format import ui_to_api

from .adherence import EVALUATOR, score_image
from .splits import noise_seeds, split_captions

TWIN = "embedded_core_model_scheduled_guidance"
CURVES = ((2.0, 2.0), (3.0, 1.5), (2.5, 1.5), (3.5, 2.0))  # (start, end), linear


def curve_report(captions: list[str], seeds: list[int], curves=CURVES) -> dict:
    """Mean adherence per curve (and per caption), each caption with its own noise seed."""
    root = tempfile.mkdtemp(prefix="fluxworks-core-curves-")
    server = embedded_only_server(root)
    try:
        info = server.get_json("/object_info")
        base = ui_to_api(build_twin(TWIN, info), info)
        ids = {node["class_type"]: key for key, node in base.items()}
        rows = []
        for start, end in curves:
            scores = []
            for caption, seed in zip(captions, seeds, strict=True):
                prompt = copy.deepcopy(base)
                prompt[ids["FluxWorksTextEncode"]]["inputs"]["prompt"] = caption
                prompt[ids["FluxWorksGuidanceSchedule"]]["inputs"].update(start_value=start, end_value=end)
                prompt[ids["KSampler"]]["inputs"]["seed"] = seed
                result = server.run(prompt)
                if result.status != "success":
                    raise RuntimeError(f"{caption!r}, curve {start}->{end}: {result.status}\n{server.log()[-3000:]}")
                [image] = result.outputs[ids["SaveImage"]]["images"]
                scores.append(score_image(server.view_image(image), caption).score)
            rows.append({"start": start, "end": end, "adherence": float(np.mean(scores)), "scores": scores})
        return {"evaluator": EVALUATOR, "example": TWIN, "captions": captions, "seeds": seeds, "curves": rows}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="validation")
    parser.add_argument("--captions", type=int, default=20)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    captions = split_captions(args.split, args.captions)
    report = curve_report(captions, noise_seeds(len(captions)))
    report["split"] = args.split
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
