"""Prompt adherence from pixels: find each captioned object by its colour, then judge its shape, size and
position, and the background colour, with plain image measurements (no learned model to trust).

Scored as a detector is, over attribute checks:
- recall: of the checks the caption asks for, the fraction the picture passes: per caption object its colour
  (found at all), shape, size and grid position, plus the background colour. An object whose colour is
  missing fails all four. (Before extra objects were counted this was the whole score.)
- precision: of the attributes the picture shows, the fraction the caption asks for. The picture shows its
  background plus colour, shape, size and position of every object seen in it. Every connected region of a
  non-background colour (at least MIN_OBJECT_AREA pixels after a 3x3 opening, centred at least EDGE_MARGIN
  from the edge) is an object; per caption object the largest region of its colour explains it, every other
  region (a stray blob, a duplicate, a shape in a colour the caption never names) is an extra object, whose
  four attributes the caption does not ask for.
An image's score is their harmonic mean (F1). With every caption object found and nothing extra, precision
equals recall and so does the score; each extra object lowers it, so the right scene plus junk cannot score
100 %.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.shapes import AREA_PER_R2, COLOURS, IMAGE_SIZE, POSITIONS, SIZES, ShapeObject, parse_caption

# Recorded in every report, so numbers from the recall-only evaluator (before extra objects counted) are not
# mixed with these.
EVALUATOR = "adherence v2: F1 of check recall and attribute precision; extra objects counted"
# A pixel further than this (RGB Euclidean) from every palette colour belongs to no colour.
MAX_COLOUR_DISTANCE = 90.0
# Components smaller than this many pixels (after a 3x3 opening) are edge blends or speckle, not objects;
# the smallest object drawn (a small triangle) covers about 140 pixels.
MIN_OBJECT_AREA = 40
# A region centred closer than this to the image edge is not an object: the renderer keeps every shape inside
# the picture, so the nearest possible centre is 9.1 px from the edge (a small square), and the VAE decoder
# paints small blobs into the border next to large objects. All 5 regions the evaluator counted as extra in
# 1000 VAE round trips of true renders (render_batch seed 7) were such blobs, centred 2.1-4.1 px from the edge.
EDGE_MARGIN = 6.0
# Shape prototypes in (extent, solidity, centroid height in the box) measured on clean renders (see tests).
SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (0.78, 0.95, 0.50),
    "square": (1.00, 1.00, 0.50),
    "triangle": (0.53, 0.91, 0.66),
    "star": (0.46, 0.64, 0.55),
}
FEATURE_WEIGHTS = np.array([1.0, 1.5, 2.0])
_SIZE_NAMES = list(SIZES)
_SIZE_EDGES = [math.sqrt(SIZES[a] * SIZES[b]) for a, b in zip(_SIZE_NAMES, _SIZE_NAMES[1:], strict=False)]
_CELL_TO_POSITION = {cell: name for name, cell in POSITIONS.items()}
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels of the 128 px image
    features: tuple[float, float, float]  # extent, solidity, centroid height in the box


@dataclass(frozen=True)
class ObjectCheck:
    expected: ShapeObject
    found: DetectedObject | None

    @property
    def colour_ok(self) -> bool:
        return self.found is not None

    @property
    def shape_ok(self) -> bool:
        return self.found is not None and self.found.shape == self.expected.shape

    @property
    def size_ok(self) -> bool:
        return self.found is not None and self.found.size == self.expected.size

    @property
    def position_ok(self) -> bool:
        return self.found is not None and self.found.position == self.expected.position

    @property
    def passed(self) -> int:
        return int(self.colour_ok) + int(self.shape_ok) + int(self.size_ok) + int(self.position_ok)


@dataclass(frozen=True)
class Adherence:
    caption: str
    background: str  # the background colour seen in the image
    expected_background: str
    checks: tuple[ObjectCheck, ...]
    extra_objects: tuple[DetectedObject, ...]  # regions no caption object explains (any colour but the background)

    @property
    def background_ok(self) -> bool:
        return self.background == self.expected_background

    @property
    def total_checks(self) -> int:
        return 4 * len(self.checks) + 1

    @property
    def passed_checks(self) -> int:
        return sum(c.passed for c in self.checks) + int(self.background_ok)

    @property
    def recall(self) -> float:
        """Of the checks the caption asks for, the fraction passed, in [0, 1]."""
        return self.passed_checks / self.total_checks

    @property
    def shown_attributes(self) -> int:
        """Background + 4 attributes per object seen (caption objects found, and extra objects)."""
        return 1 + 4 * (sum(c.colour_ok for c in self.checks) + len(self.extra_objects))

    @property
    def precision(self) -> float:
        """Of the attributes the picture shows, the fraction the caption asks for, in [0, 1]."""
        return self.passed_checks / self.shown_attributes

    @property
    def score(self) -> float:
        """Harmonic mean of recall and precision, in [0, 1]."""
        r, p = self.recall, self.precision
        return 2 * r * p / (r + p) if r + p else 0.0

    @property
    def exact(self) -> bool:
        """Every check right and nothing extra."""
        return self.recall == 1.0 and not self.extra_objects


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(128, 128, 3) uint8 from a PIL image or an array (HWC uint8, or float in [0, 1]); resized if needed."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {array.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        pil = Image.fromarray(array)
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(pil)


def colour_labels(pixels: np.ndarray) -> np.ndarray:
    """(H, W) index of the nearest palette colour per pixel, -1 where none is near enough."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    dist2 = (flat**2).sum(1, keepdims=True) - 2.0 * flat @ _PALETTE.T + (_PALETTE**2).sum(1)[None]
    labels = dist2.argmin(axis=1)
    labels[dist2.min(axis=1) > MAX_COLOUR_DISTANCE**2] = -1
    return labels.reshape(pixels.shape[:2])


def colour_share(image: Image.Image | np.ndarray, colour: str) -> float:
    """Share of the image's pixels whose nearest palette colour is `colour`."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {list(COLOURS)}")
    return float((colour_labels(to_array(image)) == _PALETTE_NAMES.index(colour)).mean())


def _shift_all(mask: np.ndarray, combine) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=combine is np.logical_or)
    out = padded[1:-1, 1:-1].copy()
    h, w = mask.shape
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = combine(out, padded[dy:dy + h, dx:dx + w])
    return out


def opening(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion then dilation: removes one-or-two-pixel rims left by anti-aliased edges."""
    eroded = _shift_all(mask, np.logical_and)
    return _shift_all(eroded, np.logical_or) & mask


def object_pixels(mask: np.ndarray, core: np.ndarray) -> np.ndarray:
    """(N, 2) pixels of `mask` within two pixels of a component `core` found on the opened mask, so thin
    parts the opening cut off (star tips) still count towards the shape."""
    grown = np.zeros_like(mask)
    grown[core[:, 0], core[:, 1]] = True
    grown = _shift_all(_shift_all(grown, np.logical_or), np.logical_or)
    return np.argwhere(grown & mask)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as (N, 2) arrays of (y, x), largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    hull = half(pts)[:-1] + half(reversed(pts))[:-1]
    xs, ys = np.array(hull, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def shape_features(pixels: np.ndarray) -> tuple[float, float, float]:
    """(extent = area / box area, solidity = area / convex hull area, centroid height within the box)."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    area = len(pixels)
    top, height = ys.min(), ys.max() - ys.min() + 1
    width = xs.max() - xs.min() + 1
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = _hull_area(corners)
    return area / (width * height), area / hull if hull else 1.0, (ys.mean() - top + 0.5) / height


def classify_shape(features: tuple[float, float, float]) -> str:
    """Nearest prototype in weighted feature space."""
    f = np.array(features)
    return min(SHAPE_PROTOTYPES, key=lambda s: float(np.sum((FEATURE_WEIGHTS * (f - SHAPE_PROTOTYPES[s])) ** 2)))


def classify_size(area: int, shape: str) -> str:
    radius = math.sqrt(area / AREA_PER_R2[shape])
    for name, edge in zip(_SIZE_NAMES, _SIZE_EDGES, strict=False):
        if radius < edge:
            return name
    return _SIZE_NAMES[-1]


def classify_position(x: float, y: float) -> str:
    third = IMAGE_SIZE / 3
    cell = (min(int(y // third), 2), min(int(x // third), 2))
    return _CELL_TO_POSITION[cell]


def describe(colour: str, pixels: np.ndarray) -> DetectedObject:
    features = shape_features(pixels)
    shape = classify_shape(features)
    cx, cy = float(pixels[:, 1].mean()) + 0.5, float(pixels[:, 0].mean()) + 0.5
    return DetectedObject(colour, shape, classify_size(len(pixels), shape), classify_position(cx, cy),
                          len(pixels), (cx, cy), tuple(round(float(v), 3) for v in features))


def _inside(centroid: tuple[float, float]) -> bool:
    return all(EDGE_MARGIN <= c <= IMAGE_SIZE - EDGE_MARGIN for c in centroid)


def detect(image: Image.Image | np.ndarray) -> tuple[str, dict[str, list[DetectedObject]]]:
    """The background colour and, per other colour, every object of that colour (largest first).

    An object is a 4-connected region of the opened colour mask with at least MIN_OBJECT_AREA pixels, centred
    at least EDGE_MARGIN from the image edge: the opening removes the one-or-two-pixel rims where anti-aliasing
    or the VAE blends two colours into a third (a red edge on yellow reads as orange), so only regions with a
    body count, and the margin drops the VAE decoder's border blobs. The described pixels are the region grown
    back into its unopened mask (see `object_pixels`)."""
    labels = colour_labels(to_array(image))
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(_PALETTE_NAMES))
    background = int(counts.argmax())
    objects: dict[str, list[DetectedObject]] = {}
    for index, colour in enumerate(_PALETTE_NAMES):
        if index == background or counts[index] < MIN_OBJECT_AREA:
            continue
        mask = labels == index
        found = [obj for obj in (describe(colour, object_pixels(mask, part))
                                 for part in components(opening(mask)) if len(part) >= MIN_OBJECT_AREA)
                 if _inside(obj.centroid)]
        if found:
            objects[colour] = found
    return _PALETTE_NAMES[background], objects


def analyse(image: Image.Image | np.ndarray) -> tuple[str, dict[str, DetectedObject]]:
    """The background colour and, per other colour, its largest object (the one a caption object is judged by)."""
    background, objects = detect(image)
    return background, {colour: found[0] for colour, found in objects.items()}


def score_image(image: Image.Image | np.ndarray, caption: str) -> Adherence:
    """How well `image` shows `caption` (a caption in the shapes grammar; others raise ValueError)."""
    scene = parse_caption(caption)
    background, objects = detect(image)
    checks = tuple(ObjectCheck(obj, objects[obj.colour][0] if obj.colour in objects else None)
                   for obj in scene.objects)
    wanted = {obj.colour for obj in scene.objects}
    extra = tuple(o for colour, found in objects.items() for o in (found[1:] if colour in wanted else found))
    return Adherence(caption, background, scene.background, checks, extra)


def summarise(results: list[Adherence]) -> dict[str, float]:
    """Means over a list of scored images: the score (F1 of recall and precision; "adherence"), recall,
    precision, exact-match rate, per-attribute accuracy per caption object, and how often extra objects appear."""
    if not results:
        raise ValueError("no scored images to summarise")
    checks = [c for r in results for c in r.checks]
    return {
        "adherence": float(np.mean([r.score for r in results])),
        "recall": float(np.mean([r.recall for r in results])),
        "precision": float(np.mean([r.precision for r in results])),
        "exact": float(np.mean([r.exact for r in results])),
        "colour": float(np.mean([c.colour_ok for c in checks])),
        "shape": float(np.mean([c.shape_ok for c in checks])),
        "size": float(np.mean([c.size_ok for c in checks])),
        "position": float(np.mean([c.position_ok for c in checks])),
        "background": float(np.mean([r.background_ok for r in results])),
        "images_with_extra_objects": float(np.mean([len(r.extra_objects) > 0 for r in results])),
        "extra_objects_per_image": float(np.mean([len(r.extra_objects) for r in results])),
        "images": len(results),
    }


# --- a concept taught by a LoRA ----------------------------------------------------------------------------------
# A LoRA can teach the embedded model a shape it never saw, named in captions by a token outside the grammar ("a
# large red sks in the center, on a blue background"). The caption is read with the token standing for a shape, and
# the token's object (the largest region of its colour) is judged by the nearest shape prototype among the original
# shapes and the new one: prototypes measured on VAE round trips of clean renders, since what the embedded VAE can show
# is the reference (see `training.train_embedded_concept.vae_prototypes`).


def nearest_prototype(features: tuple[float, float, float], prototypes: dict[str, tuple[float, float, float]]) -> str:
    """The shape whose (extent, solidity, centroid height) prototype is nearest in the weighted feature space."""
    f = np.array(features)
    return min(prototypes, key=lambda s: float(np.sum((FEATURE_WEIGHTS * (f - np.array(prototypes[s]))) ** 2)))


def concept_colour(caption: str, token: str) -> str:
    """The colour of the object the token names in a caption of the grammar with `token` as its shape word."""
    scene = parse_caption(caption.replace(f" {token} ", " circle "))
    named = [o for o, word in zip(scene.objects, _shape_words(caption, len(scene.objects)), strict=True) if word == token]
    if len(named) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one object with the token {token!r}")
    return named[0].colour


def _shape_words(caption: str, count: int) -> list[str]:
    body = caption.rpartition(", on ")[0]
    head, _, last = body.rpartition(" and ")
    parts = (head.split(", ") if head else []) + [last]
    if len(parts) != count:
        raise ValueError(f"caption {caption!r}: cannot split its object phrases")
    return [re_shape_word(part) for part in parts]


def re_shape_word(phrase: str) -> str:
    """The shape word of an object phrase ("a large red sks in the center" -> "sks")."""
    words = phrase.split()
    for marker in ("at", "on", "in"):
        if marker in words:
            return words[words.index(marker) - 1]
    raise ValueError(f"object phrase {phrase!r} has no position")


def concept_found(image: Image.Image | np.ndarray, caption: str, token: str, concept: str,
                  prototypes: dict[str, tuple[float, float, float]]) -> bool:
    """Whether the object the token names is drawn, in its colour, as `concept` (nearest of `prototypes`)."""
    colour = concept_colour(caption, token)
    _, objects = analyse(image)
    seen = objects.get(colour)
    return seen is not None and nearest_prototype(seen.features, prototypes) == concept
