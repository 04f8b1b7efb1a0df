"""The procedural shapes world the embedded model is trained on: scenes of 1-3 flat shapes in named colours,
sizes and grid positions on a coloured background, their captions, and an anti-aliased renderer.

Everything is seeded (numpy Generator), so a seed and a count give the same images on every machine.
A caption is held out (never trained on) when its SHA-256 falls in a fixed 5 % bucket; evaluation draws
its captions from that bucket only.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges like a real photo of a drawing

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (248, 140, 22),
    "yellow": (244, 214, 40),
    "green": (34, 160, 70),
    "blue": (37, 90, 225),
    "purple": (140, 60, 190),
    "white": (244, 244, 240),
    "black": (25, 25, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
# Size word -> nominal radius r in pixels at 128 px. "medium" is not written in captions.
SIZES: dict[str, float] = {"small": 9.0, "medium": 12.5, "large": 16.0}
# Position -> (row, column) of the 3x3 grid cell, and the phrase captions use for it.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
OBJECT_COUNT_WEIGHTS = (0.3, 0.4, 0.3)  # probability of 1, 2, 3 objects
HELD_OUT_BUCKETS = 20  # 1 in 20 captions is held out
POSITION_JITTER = 3.0  # pixels, uniform, around the cell centre
COLOUR_JITTER = 10  # per channel, uniform

# Geometry per shape, in units of the nominal radius r: the outer radius that is drawn, and the area
# (in r^2) the evaluator uses to turn a pixel count back into a radius.
STAR_INNER = 0.5  # inner / outer radius of the five-pointed star
OUTER_RADIUS = {"circle": 1.0, "square": 0.9, "triangle": 1.15, "star": 1.2}
AREA_PER_R2 = {
    "circle": math.pi,
    "square": (2 * 0.9) ** 2,
    "triangle": 3 * math.sqrt(3) / 4 * 1.15**2,
    "star": 5 * STAR_INNER * math.sin(math.radians(36)) * 1.2**2,
}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        words = f"{'' if self.size == 'medium' else self.size + ' '}{self.colour} {self.shape}"
        return f"{_article(words)} {words} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str

    def caption(self) -> str:
        phrases = [o.phrase() for o in self.objects]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{body}, on {_article(self.background)} {self.background} background"


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def is_held_out(caption: str) -> bool:
    """Whether a caption belongs to the evaluation split (stable across machines and Python versions)."""
    digest = hashlib.sha256(caption.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def random_scene(rng: np.random.Generator) -> Scene:
    """1-3 objects with distinct colours and distinct grid cells, on a background of yet another colour."""
    count = int(rng.choice(len(OBJECT_COUNT_WEIGHTS), p=OBJECT_COUNT_WEIGHTS)) + 1
    colours = list(COLOURS)
    picked = rng.choice(len(colours), size=count + 1, replace=False)
    positions = list(POSITIONS)
    cells = rng.choice(len(positions), size=count, replace=False)
    sizes = list(SIZES)
    objects = tuple(
        ShapeObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=colours[int(picked[i + 1])],
            size=sizes[int(rng.integers(len(sizes)))],
            position=positions[int(cells[i])],
        )
        for i in range(count)
    )
    return Scene(objects, colours[int(picked[0])])


def sample_scene(rng: np.random.Generator, held_out: bool) -> Scene:
    """A random scene from the training split (`held_out=False`) or the evaluation split."""
    while True:
        scene = random_scene(rng)
        if is_held_out(scene.caption()) == held_out:
            return scene


def held_out_captions(count: int, seed: int = 1234) -> list[str]:
    """`count` distinct evaluation captions, the same list for a given seed everywhere."""
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    while len(captions) < count:
        caption = sample_scene(rng, held_out=True).caption()
        if caption not in captions:
            captions.append(caption)
    return captions


_OBJECT = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>[a-z]+) (?P<shape>[a-z]+) "
    r"(?P<phrase>at the top left|at the top right|at the top|on the left|in the center|on the right|"
    r"at the bottom left|at the bottom right|at the bottom)$"
)
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption`; a caption outside the grammar raises ValueError naming the bad part."""
    text = caption.strip().lower().rstrip(".")
    body, sep, background = text.rpartition(", on ")
    background = re.sub(r"^an? ", "", background)
    if not sep or not background.endswith(" background"):
        raise ValueError(f"caption {caption!r} does not end with ', on a <colour> background'")
    background = background[: -len(" background")]
    if background not in COLOURS:
        raise ValueError(f"caption {caption!r}: unknown background colour {background!r}; known: {list(COLOURS)}")
    head, _, last = body.rpartition(" and ")
    parts = ([p for p in head.split(", ")] if head else []) + [last]
    objects = []
    for part in parts:
        match = _OBJECT.match(part)
        if match is None:
            raise ValueError(f"caption {caption!r}: cannot read the object phrase {part!r}")
        colour, shape = match["colour"], match["shape"]
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"caption {caption!r}: unknown colour or shape in {part!r}")
        objects.append(ShapeObject(shape, colour, match["size"] or "medium", _PHRASE_TO_POSITION[match["phrase"]]))
    return Scene(tuple(objects), background)


def cell_centre(position: str) -> tuple[float, float]:
    """(x, y) pixel centre of a named grid cell."""
    row, col = POSITIONS[position]
    third = IMAGE_SIZE / 3
    return (col + 0.5) * third, (row + 0.5) * third


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of an upright square, triangle (apex up) or star (point up) of nominal radius r."""
    outer = OUTER_RADIUS[shape] * r
    if shape == "square":
        return [(cx - outer, cy - outer), (cx + outer, cy - outer), (cx + outer, cy + outer), (cx - outer, cy + outer)]
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + outer * math.cos(math.radians(a)), cy + outer * math.sin(math.radians(a))) for a in angles]
    if shape == "star":
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else outer * STAR_INNER
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shifted = np.clip(np.array(rgb) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    return tuple(int(v) for v in shifted)


@dataclass(frozen=True)
class ExtraShape:
    """A shape the base model never saw (the example LoRA's diamond, the training concept's heart), drawn by
    `render` with the built-in shapes' supersampling, jitter, margins and palette, so only the outline differs."""

    outer_radius: float  # farthest vertex from the centre, in nominal radii (sets the margin to the edge)
    polygon: Callable[[float, float, float], list[tuple[float, float]]]  # (cx, cy, r) -> vertices


def render(scene: Scene, rng: np.random.Generator, extra_shapes: Mapping[str, ExtraShape] | None = None) -> np.ndarray:
    """(128, 128, 3) uint8 image of `scene`, with small random jitter of positions and colours; shapes named in
    `extra_shapes` are drawn by their own polygon."""
    extra = extra_shapes or {}
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), _jittered(COLOURS[scene.background], rng))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        r = SIZES[obj.size]
        shape = extra.get(obj.shape)
        margin = (shape.outer_radius if shape else OUTER_RADIUS[obj.shape]) * r + 1
        cx, cy = (c + rng.uniform(-POSITION_JITTER, POSITION_JITTER) for c in cell_centre(obj.position))
        cx, cy = (min(max(c, margin), IMAGE_SIZE - margin) for c in (cx, cy))
        fill = _jittered(COLOURS[obj.colour], rng)
        if obj.shape == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
        else:
            vertices = shape.polygon(cx, cy, r) if shape else shape_polygon(obj.shape, cx, cy, r)
            draw.polygon([(x * s, y * s) for x, y in vertices], fill=fill)
    return np.asarray(canvas.reduce(s))


def render_batch(seed: int, index: int, count: int, held_out: bool = False) -> tuple[np.ndarray, list[str]]:
    """Chunk `index` of a dataset: `count` images (N, 128, 128, 3) uint8 and their captions.

    Each chunk has its own generator seeded with (seed, index), so chunks can be made in any order or
    in parallel and the dataset stays the same.
    """
    rng = np.random.default_rng([seed, index])
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        scene = sample_scene(rng, held_out)
        images[i] = render(scene, rng)
        captions.append(scene.caption())
    return images, captions
