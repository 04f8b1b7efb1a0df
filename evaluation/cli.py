"""The command line the embedded-model sweeps share (step cache curve, core caches, fp8 quality): which tokenizers,
which caption split, how many captions, steps and guidance, where the JSON report goes.

Why one place: each sweep must read captions, tokenizers and settings the same way, or two reports of "the same"
setting differ in what they measured."""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from .embedded import RECOMMENDED_GUIDANCE, EmbeddedPipeline
from .splits import SPLITS


def sweep_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """A parser with the shared sweep options; a sweep adds its own (thresholds, configs ...)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--clip-tokenizer", default=".comfyui/comfy/sd1_tokenizer")
    parser.add_argument("--t5-tokenizer", default=".comfyui/comfy/text_encoders/t5_tokenizer")
    parser.add_argument("--split", default="validation", choices=SPLITS,
                        help="caption split (settings are chosen on validation, reported on test)")
    parser.add_argument("--captions", type=int, default=50, help="the first N captions of the split")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=RECOMMENDED_GUIDANCE)
    parser.add_argument("--json", required=True, help="where the report goes")
    return parser


def start(args: argparse.Namespace, device: str = "cpu") -> EmbeddedPipeline:
    """Logging and thread count as every sweep runs them (OMP_NUM_THREADS threads, default 1), and the embedded
    pipeline with the tokenizers the command line names."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return EmbeddedPipeline.load((args.clip_tokenizer, args.t5_tokenizer), device=device)


def write_report(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
