"""What the GPU benchmark scripts share: one JSON line on stdout per finished measurement (the tail of a
device command's output), the same results rewritten to a file (so a run cut off keeps its part), and a
device sync before reading a timer."""

from __future__ import annotations

import json

import torch


def write_report(results: dict, path: str) -> None:
    print(json.dumps(results), flush=True)  # noqa: T201 - a benchmark script reports on stdout
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
