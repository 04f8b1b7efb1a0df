"""The pictures and captions of a training set, read and checked before anything is encoded, and fitted to
aspect-ratio buckets.

A folder holds `name.png` (or .jpg, .jpeg, .webp, .bmp) with `name.txt` beside it, the layout kohya sd-scripts and
ai-toolkit read. Every problem is reported before training starts, naming the file and the fix: an empty or missing
folder, a picture without a caption (unless an instance prompt stands in, as `train_dreambooth_lora_flux.py
--instance_prompt` does for uncaptioned pictures), a file that is not a picture, and, without buckets, a size that is
not a multiple of 16 (the VAE halves three times, the transformer packs 2x2 latent patches).

Buckets: each picture is scaled to cover, then centre-cropped to, the size of its own aspect ratio whose area is about
`resolution`² with both sides multiples of 16 (kohya's bucketing in effect, without a fixed bucket list: the 16-pixel
grid makes the buckets). Pictures of one size share a bucket, and a training batch comes from one bucket.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MULTIPLE = 16


@dataclass(frozen=True)
class Example:
    name: str  # the file name (or "image N" for a batch), for messages
    pixels: np.ndarray  # (H, W, 3) uint8
    caption: str


def _caption(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return " ".join(f.read().split())


def read_folder(folder: str, instance_prompt: str = "") -> list[Example]:
    """Every picture of `folder` (sorted by name) with its caption; ValueError naming what is wrong and the fix."""
    if not os.path.isdir(folder):
        raise ValueError(f"dataset folder {folder} does not exist: create it under ComfyUI's input folder and put "
                         "name.png + name.txt pairs in it")
    names = sorted(os.listdir(folder))
    pictures = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not pictures:
        raise ValueError(f"dataset folder {folder} holds no pictures ({', '.join(IMAGE_EXTENSIONS)}): put "
                         "name.png + name.txt pairs in it")
    uncaptioned = [n for n in pictures if not os.path.isfile(os.path.join(folder, os.path.splitext(n)[0] + ".txt"))]
    if uncaptioned and not instance_prompt.strip():
        shown = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
        raise ValueError(f"{len(uncaptioned)} pictures in {folder} have no caption file ({shown}): add name.txt "
                         "beside each name.png, or set instance_prompt to caption them all")
    examples = []
    for name in pictures:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f"{path} cannot be read as a picture ({exc}): replace or remove it") from exc
        text_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        caption = _caption(text_path) if os.path.isfile(text_path) else ""
        examples.append(Example(name, pixels, caption or instance_prompt.strip()))
    empty = [e.name for e in examples if not e.caption]
    if empty:
        raise ValueError(f"the caption files of {', '.join(empty[:5])} in {folder} are empty: write a caption in "
                         "each, or set instance_prompt")
    return examples


def from_batch(images: np.ndarray, captions: str, instance_prompt: str = "") -> list[Example]:
    """(N, H, W, 3) float pictures in [0, 1] (a ComfyUI IMAGE) with one caption per line (or instance_prompt)."""
    lines = [" ".join(line.split()) for line in captions.splitlines() if line.strip()]
    if not lines and instance_prompt.strip():
        lines = [instance_prompt.strip()] * len(images)
    if len(lines) != len(images):
        raise ValueError(f"the image batch has {len(images)} pictures but captions has {len(lines)} non-empty lines: "
                         "write one caption per line, in the batch's order, or leave captions empty and set "
                         "instance_prompt")
    pixels = (np.clip(images[..., :3], 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return [Example(f"image {i}", pixels[i], lines[i]) for i in range(len(lines))]


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height), multiples of 16, with the picture's aspect ratio and an area of about resolution²."""
    aspect = width / height
    w = max(MULTIPLE, round(resolution * math.sqrt(aspect) / MULTIPLE) * MULTIPLE)
    h = max(MULTIPLE, round(resolution / math.sqrt(aspect) / MULTIPLE) * MULTIPLE)
    return w, h


def fit(example: Example, resolution: int) -> np.ndarray:
    """The picture in its bucket (resolution > 0), or as it is when its sides are multiples of 16 (resolution 0)."""
    h, w = example.pixels.shape[:2]
    if resolution <= 0:
        if w % MULTIPLE or h % MULTIPLE:
            fixed = (w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE)
            raise ValueError(f"{example.name} is {w}x{h}; without buckets (resolution 0) both sides must be multiples "
                             f"of 16: crop it (e.g. to {fixed[0]}x{fixed[1]}) or set resolution (e.g. 512) to bucket "
                             "the pictures")
        return example.pixels
    bw, bh = bucket_size(w, h, resolution)
    scale = max(bw / w, bh / h)
    sw, sh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = Image.fromarray(example.pixels).resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - bw) // 2, (sh - bh) // 2
    return np.asarray(resized.crop((left, top, left + bw, top + bh)))
