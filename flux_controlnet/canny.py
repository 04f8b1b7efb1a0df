"""Canny edge detection in torch (Canny 1986): Gaussian blur, Sobel gradients, non-maximum suppression along
the gradient direction, double threshold and hysteresis. Runs on whatever device the image is on.

Thresholds are fractions of the gradient of a sharp black-to-white step, which reads 1.0 (Sobel / 4). Colour
images use, per pixel, the channel with the strongest gradient (as OpenCV's Canny does for colour input), so
edges between colours of equal brightness are found too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with a kernel of radius ceil(3 sigma), reflected borders."""
    if sigma <= 0:
        return gray
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=gray.device, dtype=gray.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    mode = "reflect" if min(gray.shape[-2:]) > radius else "replicate"
    out = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))


def sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of (N, 1, H, W), x to the right and y downwards, scaled so a sharp unit step reads 1."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray.device, dtype=gray.dtype)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, (kx / 4).view(1, 1, 3, 3))
    gy = F.conv2d(padded, (kx.t() / 4).reshape(1, 1, 3, 3))
    return gx, gy


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = x[y + dy, x + dx], zero outside the image."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep pixels whose magnitude peaks across the edge: the gradient direction is rounded to 0, 45, 90 or
    135 degrees and a pixel must beat its neighbour behind (strictly) and ahead (or tie), so a two-pixel
    plateau yields a one-pixel line."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45.0) % 4).long()  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135 deg
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead, behind = _shifted(magnitude, dy, dx), _shifted(magnitude, -dy, -dx)
        keep |= (sector == index) & (magnitude > behind) & (magnitude >= ahead)
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def hysteresis(strong: torch.Tensor, weak: torch.Tensor, check_every: int = 8,
               interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """Grow `strong` edges into 8-connected `weak` pixels until nothing changes (boolean (B, 1, H, W)).
    Edges grow one pixel per pass, so a long weak edge on a large image takes thousands of passes (its length
    in pixels): `interrupt` (a cancel check that raises) runs every `check_every` passes."""
    edges = strong.float()
    weak_f = (weak | strong).float()
    while True:
        if interrupt is not None:
            interrupt()
        before = edges
        for _ in range(check_every):
            edges = F.max_pool2d(edges, 3, stride=1, padding=1) * weak_f
        if torch.equal(edges, before):
            return edges.bool()


def canny_edges(image: torch.Tensor, low_threshold: float, high_threshold: float,
                blur_sigma: float = 1.0, interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> edge map (B, H, W) of 0/1 on the image's device; `interrupt` is checked
    during hysteresis, the only stage whose time grows with the edges' length."""
    if not 0.0 <= low_threshold <= high_threshold:
        raise ValueError(f"Canny thresholds need 0 <= low ({low_threshold}) <= high ({high_threshold})")
    if blur_sigma < 0:
        raise ValueError(f"blur_sigma must be non-negative, got {blur_sigma}")
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE of shape (batch, height, width, channels), got {tuple(image.shape)}")
    b, h, w, c = image.shape
    channels = image[..., :3].float().movedim(-1, 1).reshape(b * min(c, 3), 1, h, w)
    gx, gy = sobel(gaussian_blur(channels, blur_sigma))
    gx, gy = gx.view(b, -1, h, w), gy.view(b, -1, h, w)
    strength = gx * gx + gy * gy
    strongest = strength.argmax(dim=1, keepdim=True)  # per pixel, the channel with the largest gradient
    gx, gy = gx.gather(1, strongest), gy.gather(1, strongest)
    magnitude = strength.gather(1, strongest).sqrt()
    thin = non_maximum_suppression(magnitude, gx, gy)
    candidate = thin > 0
    edges = hysteresis(candidate & (thin >= high_threshold), candidate & (thin >= low_threshold),
                       interrupt=interrupt)
    return edges[:, 0].to(image.dtype if image.is_floating_point() else torch.float32)
