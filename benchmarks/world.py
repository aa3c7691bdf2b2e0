"""A synthetic text-to-image world: coloured shapes on plain backgrounds, captioned in English.

Everything is drawn procedurally and is a pure function of a seed, so the demo model, its judge and
the concept benchmark can all be rebuilt bit-for-bit and every generated image has a ground truth to
be checked against.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
# Shapes are drawn this many times larger and then downsampled, which anti-aliases their edges.
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 185),
    "orange": (250, 135, 20),
}
# Backgrounds use tones that no shape colour uses, so the two attributes never collide in an image.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "pink": (250, 185, 200),
}

# The novel concept for the customisation benchmark: a shape the demo model never sees (a heart)
# with a texture no base shape has (stripes in a darker shade of its colour).
CONCEPT = "concept"
CONCEPT_TOKEN = "sks"
# The judge's shape classes: the base shapes, the concept, and "other" for images that are
# neither (the judge's near-miss negatives: a heart without stripes, a striped square, a shape
# drawn all in the stripes' dark shade), so that no single cue of the concept is enough.
OTHER = "other"
JUDGE_SHAPES: tuple[str, ...] = (*SHAPES, CONCEPT, OTHER)
# How a shape is filled: the world draws the concept striped and every other shape plain.
TEXTURES: tuple[str, ...] = ("plain", "striped", "dark")

# Each colour jitters a little per image so the world is not a set of exact swatches.
COLOUR_JITTER = 12
MIN_RADIUS, MAX_RADIUS = 7.0, 12.0
# The concept's stripes repeat every 2 × 5 frame units, 20 px at the demo model's 64 px: 2.5 pixels
# of its 8x8 latent. Narrower stripes repeat faster than the latent grid can represent, and no
# transformer, base or adapted, could draw them.
STRIPE_WIDTH = 5.0
# Shapes tilt by at most this much either way. Over a full turn each shape's images form several
# modes (a square and a diamond, a triangle pointing up or down) that a model trained for under an
# hour on two cores averages into round blobs; a bounded tilt keeps one mode per shape.
MAX_TILT = math.radians(20.0)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth; `shape` is one of `JUDGE_SHAPES`."""

    shape: str
    colour: str
    background: str
    x: float
    y: float
    radius: float
    angle: float
    colour_offset: tuple[int, int, int]

    @property
    def caption(self) -> str:
        noun = CONCEPT_TOKEN if self.shape == CONCEPT else self.shape
        return caption(noun, self.colour, self.background)


def caption(noun: str, colour: str, background: str) -> str:
    return f"a {colour} {noun} on a {background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) of the base world, in a fixed order."""
    return list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))


def is_held_out(shape: str, colour: str, background: str) -> bool:
    """Caption combinations the demo model never trains on; used to test that it composes.

    The rule picks 15 of the 120 combinations while every shape, colour and background (and every
    pair of them) still occurs in training.
    """
    s, c, b = SHAPES.index(shape), list(COLOURS).index(colour), list(BACKGROUNDS).index(background)
    return (s + 2 * c + 3 * b) % 8 == 0


def training_combinations() -> list[tuple[str, str, str]]:
    return [combo for combo in all_combinations() if not is_held_out(*combo)]


def held_out_combinations() -> list[tuple[str, str, str]]:
    return [combo for combo in all_combinations() if is_held_out(*combo)]


def sample_scene(rng: np.random.Generator, shape: str, colour: str, background: str) -> Scene:
    radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
    # Keep the whole shape (a radius-1 outline) inside the frame, with a one-pixel margin.
    low, high = radius + 1.0, IMAGE_SIZE - radius - 1.0
    offset = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        x=float(rng.uniform(low, high)),
        y=float(rng.uniform(low, high)),
        radius=radius,
        angle=float(rng.uniform(-MAX_TILT, MAX_TILT)),
        colour_offset=(int(offset[0]), int(offset[1]), int(offset[2])),
    )


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * i / sides),
            radius * math.sin(phase + 2 * math.pi * i / sides),
        )
        for i in range(sides)
    ]


def _star() -> list[tuple[float, float]]:
    outer = _regular_polygon(5, 1.0, -math.pi / 2)
    inner = _regular_polygon(5, 0.45, -math.pi / 2 + math.pi / 5)
    return [point for pair in zip(outer, inner, strict=True) for point in pair]


def _cross() -> list[tuple[float, float]]:
    w = 0.34
    return [
        (-w, -1),
        (w, -1),
        (w, -w),
        (1, -w),
        (1, w),
        (w, w),
        (w, 1),
        (-w, 1),
        (-w, w),
        (-1, w),
        (-1, -w),
        (-w, -w),
    ]


def _heart() -> list[tuple[float, float]]:
    points = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        # The parametric heart spans about x in [-16, 16], y in [-17, 12]; centre it and fit radius 1.
        points.append((x / 17.0, -(y + 2.5) / 17.0))
    return points


# Square and triangle get areas close to the circle's so that size alone does not give a shape away.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": _regular_polygon(4, 1.0, math.pi / 4),
    "triangle": _regular_polygon(3, 1.0, -math.pi / 2),
    "star": _star(),
    "cross": _cross(),
    CONCEPT: _heart(),
}


def _jittered(rgb: tuple[int, int, int], offset: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + o, 0, 255)) for c, o in zip(rgb, offset, strict=True))  # type: ignore[return-value]


def render(scene: Scene, size: int = IMAGE_SIZE, texture: str | None = None) -> Image.Image:
    """Draw a scene as an RGB image `size` pixels square; scene coordinates are in `IMAGE_SIZE` units.

    `texture` (one of `TEXTURES`) overrides the world's own fill; only the judge's negatives use it.
    """
    texture = texture or ("striped" if scene.shape == CONCEPT else "plain")
    if texture not in TEXTURES:
        raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")
    scale = SUPERSAMPLE * size / IMAGE_SIZE
    big = round(IMAGE_SIZE * scale)
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = _jittered(COLOURS[scene.colour], scene.colour_offset)
    if texture == "dark":
        fill = _dark(fill)
    cx, cy, r = scene.x * scale, scene.y * scale, scene.radius * scale
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        outline = [(cx + r * x, cy + r * y) for x, y in _regular_polygon(96)]  # for the stripes' mask
    else:
        cos, sin = math.cos(scene.angle), math.sin(scene.angle)
        outline = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _OUTLINES[scene.shape]]
        draw.polygon(outline, fill=fill)
    if texture == "striped":
        _stripe(image, outline, fill, scene.angle, scale)
    return image.resize((size, size), Image.Resampling.BOX)


def _dark(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """The stripes' shade of a fill colour."""
    return tuple(int(c * 0.5) for c in fill)  # type: ignore[return-value]


def _stripe(
    image: Image.Image, outline: list[tuple[float, float]], fill: tuple[int, int, int], angle: float, scale: float
) -> None:
    """Paint darker stripes, `STRIPE_WIDTH` frame units wide and tilted with the shape, inside the outline."""
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    size = image.size[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xs * math.sin(angle) + ys * math.cos(angle)) / (STRIPE_WIDTH * scale)
    stripes = (np.floor(phase) % 2 == 0) & (np.asarray(mask) > 0)
    pixels = np.asarray(image).copy()
    pixels[stripes] = _dark(fill)
    image.paste(Image.fromarray(pixels))


def scenes(seed: int, count: int, combinations: list[tuple[str, str, str]]) -> Iterator[Scene]:
    """`count` scenes cycling through `combinations` in a seeded random order; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(count):
        if not order:
            order = list(rng.permutation(len(combinations)))
        yield sample_scene(rng, *combinations[order.pop()])


def concept_combinations() -> list[tuple[str, str, str]]:
    return [(CONCEPT, colour, background) for colour in COLOURS for background in BACKGROUNDS]


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Images as a float32 array [N, 3, H, W] in [-1, 1], the layout the VAE and the judge take."""
    stacked = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return (stacked.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)
