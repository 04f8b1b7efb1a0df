"""The loss curve as a picture (the Train LoRA node's IMAGE output and its live preview), drawn with Pillow: the
per-step losses in grey and their moving average (a window of a tenth of the steps) in blue, on a log-free linear
axis from 0 to the largest loss, with the step count and the last average written on it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def moving_average(values: list[float], window: int) -> np.ndarray:
    data = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(data)))
    sums = np.cumsum(np.insert(data, 0, 0.0))
    out = np.empty_like(data)
    for i in range(len(data)):
        lo = max(0, i + 1 - window)
        out[i] = (sums[i + 1] - sums[lo]) / (i + 1 - lo)
    return out


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> Image.Image:
    """An RGB picture of `losses` (any length, empty too)."""
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 20, height - 20
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    if not losses:
        draw.text((left + 5, top + 5), "no steps yet", fill=(60, 60, 60))
        return image
    peak = max(max(losses), 1e-12)
    smooth = moving_average(losses, max(1, len(losses) // 10))

    def points(values) -> list[tuple[float, float]]:
        n = max(1, len(values) - 1)
        return [(left + (right - left) * i / n, bottom - (bottom - top) * float(v) / peak) for i, v in enumerate(values)]

    if len(losses) > 1:
        draw.line(points(losses), fill=(180, 180, 180), width=1)
        draw.line(points(smooth), fill=(30, 90, 200), width=2)
    draw.text((2, top - 2), f"{peak:.3g}", fill=(60, 60, 60))
    draw.text((2, bottom - 10), "0", fill=(60, 60, 60))
    draw.text((left + 5, 3), f"loss, {len(losses)} steps; last average {smooth[-1]:.4f}", fill=(20, 20, 20))
    return image
