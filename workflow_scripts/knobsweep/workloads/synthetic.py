"""Synthetic scenes written in the real VQA v2 / COCO file formats, and an in-memory API for training.

A scene is a textured background with coloured shapes of three sizes (large, small, tiny); some large
shapes carry a small seven-segment digit. Tiny shapes and digits are drawn at full resolution and are
only a few dozen pixels across at ~2 MP, so at small vision-token budgets they blur away: resolution
genuinely matters. Questions cover the three VQA answer types (yes/no balanced, number, other) with ten
simulated human answers each; captions mention shapes, colours, counts, positions and the background.

The grammar is small and regular so that a tiny model can learn it: every word any question, answer,
caption or default prompt can contain is in `VOCABULARY`, both as `tokenize_words` splits it (lowercased)
and in the capitalised forms that occur, so a word-level tokenizer with or without lowercasing (e.g.
tokenizers' `Whitespace` pre-tokenizer) covers the text.

Determinism: everything is drawn from the numpy Generator passed in (or seeded from `seed`); background
textures are pure functions of their kind. Same seed and same Pillow version give the same bytes.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from knobsweep.workloads import prompts

# ---------------------------------------------------------------------------------------------------
# The scene vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (247, 210, 35),
    "purple": (148, 70, 190),
    "orange": (255, 127, 14),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
SIZES = ("large", "small", "tiny")
# Radius as a fraction of the image's shorter side. At 1200 px a tiny shape is ~25-35 px across,
# about one 32x32-px vision token at the largest budget and a few pixels at the smallest.
SIZE_RADIUS = {"large": (0.075, 0.10), "small": (0.03, 0.042), "tiny": (0.011, 0.015)}
MARKER_SHAPES = ("circle", "square", "hexagon", "diamond")  # shapes with room for a digit
MARKER_HEIGHT = 0.022  # digit height as a fraction of the shorter side (~26 px at 1200 px)
BACKGROUNDS = ("wooden", "sandy", "stone", "tiled")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Largest budget 1872 tokens x 32x32 px ~ 1.92 MP; every default size is at or above it.
DEFAULT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((1600, 1200), (1200, 1600), (1920, 1080), (1408, 1408))

_CONFUSABLE_COLORS = {
    "red": ("orange", "purple"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "white"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("blue", "red"),
    "white": ("yellow",),
    "black": ("purple", "blue"),
}
_COLOR_SHADES = ("dark", "light", "bright")  # "dark red": right to a person, a miss to exact match
_CONFUSABLE_SHAPES = {
    "circle": ("hexagon", "oval"),
    "square": ("diamond", "rectangle"),
    "triangle": ("star", "diamond"),
    "diamond": ("square", "triangle"),
    "star": ("triangle",),
    "hexagon": ("circle", "octagon"),
}
_CONFUSABLE_DIGITS = {
    1: (7,),
    2: (7, 5),
    3: (8,),
    4: (9,),
    5: (6, 3),
    6: (5, 8),
    7: (1,),
    8: (3, 6, 9),
    9: (8, 4),
}
# Seven-segment digits: a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle.
_SEGMENTS = {
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}


def as_generator(rng: np.random.Generator | random.Random) -> np.random.Generator:
    """The numpy Generator to draw from; a `random.Random` seeds one (deterministically, advancing it)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(128))
    raise TypeError(f"rng must be a numpy Generator or random.Random, got {type(rng).__name__}")


def tokenize_words(text: str) -> list[str]:
    """The pre-tokenizer VOCABULARY is written for: lowercase, then words (\\w+) and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


# ---------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "large" | "small" | "tiny"
    x: float  # centre as a fraction of the image width
    y: float  # centre as a fraction of the image height
    radius: float  # fraction of the image's shorter side
    marker: int | None = None  # digit drawn on the object, if any

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    objects: tuple[SceneObject, ...]
    background: str  # one of BACKGROUNDS

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def render_scene(rng: np.random.Generator | random.Random, *, width: int, height: int) -> Scene:
    """Draw a random scene of `width` x `height` pixels from `rng` (the only source of randomness)."""
    rng = as_generator(rng)
    if width < 32 or height < 32:
        raise ValueError(f"scene size {width}x{height} is too small (minimum 32x32)")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    objects = _sample_objects(rng, width / height)
    image = _background_image(background, width, height, rng)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj, width, height)
    return Scene(image=image, objects=tuple(objects), background=background)


def _sample_objects(rng: np.random.Generator, aspect: float) -> list[SceneObject]:
    # A few colours and shapes per scene, so repeats (and thus interesting counts) are common.
    colors = list(rng.choice(list(COLORS), size=int(rng.integers(3, 6)), replace=False))
    shapes = list(rng.choice(SHAPES, size=int(rng.integers(2, 5)), replace=False))
    counts = {
        "large": int(rng.integers(1, 4)),
        "small": int(rng.integers(1, 6)),
        "tiny": int(rng.integers(2, 7)),
    }
    # Work in units of the shorter side: the image spans [0, w] x [0, h].
    w, h = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for size in SIZES:  # large first: they are the hardest to fit
        for _ in range(counts[size]):
            radius = float(rng.uniform(*SIZE_RADIUS[size]))
            margin = radius + 0.03
            for _attempt in range(40):
                px, py = float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin))
                if all((px - qx) ** 2 + (py - qy) ** 2 > (radius + qr + 0.03) ** 2 for qx, qy, qr in placed):
                    break
            else:
                continue  # no room: drop this object
            placed.append((px, py, radius))
            shape = str(shapes[int(rng.integers(len(shapes)))])
            marker = None
            if size == "large" and shape in MARKER_SHAPES and rng.random() < 0.6:
                marker = int(rng.integers(1, 10))
            objects.append(
                SceneObject(
                    shape, str(colors[int(rng.integers(len(colors)))]), size, px / w, py / h, radius, marker
                )
            )
    return objects


@functools.cache
def _texture(kind: str) -> np.ndarray:
    """A 512x512 RGB texture, a pure function of `kind` (fixed seed), pre-rendered once per process."""
    n = 512
    rng = np.random.default_rng(BACKGROUNDS.index(kind) + 1000)

    def noise(cells: int) -> np.ndarray:
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        return np.asarray(grid.resize((n, n), Image.BICUBIC), dtype=np.float32) / 255.0

    fractal = sum(noise(c) * wgt for c, wgt in ((4, 0.4), (16, 0.3), (64, 0.2), (256, 0.1)))
    yy = np.mgrid[0:n, 0:n][0].astype(np.float32) / n
    if kind == "wooden":
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * 14 + fractal * 2.5))
        rgb = np.stack([150, 105, 62]) * (0.75 + 0.3 * grain[..., None])
    elif kind == "sandy":
        rgb = np.stack([214, 192, 150]) * (0.88 + 0.2 * noise(256)[..., None] + 0.06 * fractal[..., None])
    elif kind == "stone":
        rgb = np.stack([138, 136, 132]) * (0.6 + 0.6 * fractal[..., None])
    else:  # tiled: light tiles with darker grout every 64 px
        grout = ((np.mgrid[0:n, 0:n] % 64) < 4).any(axis=0)
        rgb = np.stack([206, 202, 192]) * (0.93 + 0.1 * fractal[..., None])
        rgb[grout] = (150, 146, 140)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _background_image(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    # A random crop of the pre-rendered texture with the image's aspect, upsampled: cheap at 2 MP.
    texture = Image.fromarray(_texture(kind))
    n = texture.width
    scale = float(rng.uniform(0.55, 1.0))
    cw, ch = (
        (n * scale, n * scale * height / width)
        if width >= height
        else (n * scale * width / height, n * scale)
    )
    x0, y0 = float(rng.uniform(0, n - cw)), float(rng.uniform(0, n - ch))
    if rng.random() < 0.5:
        texture = texture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return texture.resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(k: int, radius: float, start: float) -> np.ndarray:
        angles = start + np.arange(k) * 2 * np.pi / k
        return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)

    if shape == "square":
        s = r * 0.85
        pts = np.array([(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)])
    elif shape == "triangle":
        pts = ring(3, r, -np.pi / 2)
    elif shape == "diamond":
        pts = np.array([(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)])
    elif shape == "star":
        outer, inner = ring(5, r, -np.pi / 2), ring(5, 0.45 * r, -np.pi / 2 + np.pi / 5)
        pts = np.stack([outer, inner], axis=1).reshape(-1, 2)
    elif shape == "hexagon":
        pts = ring(6, r, 0.0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(float(x), float(y)) for x, y in pts]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, width: int, height: int) -> None:
    s = min(width, height)
    cx, cy, r = obj.x * width, obj.y * height, obj.radius * s
    fill = COLORS[obj.color]
    outline = tuple(int(c * 0.55) for c in fill) if obj.color != "black" else (90, 90, 90)
    line = max(1, round(r * 0.06))
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=line)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill, outline=outline, width=line)
    if obj.marker is not None:
        luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        _draw_digit(
            draw, obj.marker, cx, cy, MARKER_HEIGHT * s, (20, 20, 20) if luminance > 140 else (250, 250, 250)
        )


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, cx: float, cy: float, h: float, color) -> None:
    w, t = 0.55 * h, max(1.0, 0.17 * h)
    x0, x1, y0, y1, ym = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2, cy
    rects = {
        "a": (x0, y0, x1, y0 + t),
        "d": (x0, y1 - t, x1, y1),
        "g": (x0, ym - t / 2, x1, ym + t / 2),
        "f": (x0, y0, x0 + t, ym),
        "b": (x1 - t, y0, x1, ym),
        "e": (x0, ym, x0 + t, y1),
        "c": (x1 - t, ym, x1, y1),
    }
    for seg in _SEGMENTS[digit]:
        draw.rectangle(rects[seg], fill=color)


# ---------------------------------------------------------------------------------------------------
# Questions and simulated human answers


class SyntheticQuestion(NamedTuple):
    question: str
    answers: list[str]  # ten simulated human answers
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str  # a real VQA question-type prefix, e.g. "how many", "what color is the"
    canonical_answer: str  # the true answer in its normalised form (= multiple_choice_answer)


# kind -> (weight, answer_type); the weights give ~30% yes/no, ~35% number, ~35% other.
_QUESTION_KINDS = {
    "exist": (0.20, "yes/no"),
    "exist_any": (0.10, "yes/no"),
    "count_color_shape": (0.15, "number"),
    "count_shape": (0.08, "number"),
    "marker": (0.12, "number"),
    "color": (0.15, "other"),
    "shape": (0.10, "other"),
    "side": (0.10, "other"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _unique(objects: Sequence[SceneObject], key) -> list[SceneObject]:
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def _candidates(scene: Scene, kind: str, rng: np.random.Generator) -> list[tuple[str, str, str, str, bool]]:
    """Every question of `kind` the scene supports: (question, question_type, answer kind, answer, hard)."""
    objs = scene.objects
    colors = sorted({o.color for o in objs})
    shapes = sorted({o.shape for o in objs})
    out = []
    if kind == "exist":
        # Balanced yes/no: a present object gives "yes"; a near miss about the same shape (a colour, and
        # a size, that the scene has, but never on that shape together) gives "no".
        present = {(o.size, o.color, o.shape) for o in objs}
        present_cs = {(o.color, o.shape) for o in objs}
        yes, no = [], []
        for o in objs:
            with_size = bool(rng.random() < 0.5)
            yes.append((o.describe(), o.size == "tiny") if with_size else (f"{o.color} {o.shape}", False))
            for _ in range(10):
                if with_size:
                    miss = (str(rng.choice(SIZES)), str(rng.choice(colors)), o.shape)
                    if miss not in present:
                        no.append((" ".join(miss), miss[0] == "tiny"))
                        break
                else:
                    miss = (str(rng.choice(list(COLORS))), o.shape)
                    if miss not in present_cs:
                        no.append((" ".join(miss), False))
                        break
        n = min(len(yes), len(no))
        for answer, descs in (("yes", yes[:n]), ("no", no[:n])):
            for desc, hard in descs:
                article = _article(desc)
                out.append(
                    (
                        f"is there {article} {desc}?",
                        "is there a" if article == "a" else "is there",
                        "yesno",
                        answer,
                        hard,
                    )
                )
        return out
    if kind == "exist_any":
        present_cs = {(o.color, o.shape) for o in objs}
        for c in colors:
            for s in shapes:
                answer = "yes" if (c, s) in present_cs else "no"
                out.append((f"are there any {c} {_plural(s)}?", "are there any", "yesno", answer, False))
        # Keep yes and no equally frequent.
        yes = [q for q in out if q[3] == "yes"]
        no = [q for q in out if q[3] == "no"]
        n = min(len(yes), len(no))
        return yes[:n] + no[:n] if n else []
    if kind == "count_color_shape":
        for c in colors:
            for s in shapes:
                n = sum(o.color == c and o.shape == s for o in objs)
                template = (
                    "how many {} {} are there?"
                    if rng.random() < 0.7
                    else "how many {} {} are in the picture?"
                )
                out.append((template.format(c, _plural(s)), "how many", "number", str(n), n > 3))
        return out
    if kind == "count_shape":
        for s in shapes:
            n = sum(o.shape == s for o in objs)
            template = "how many {} are there?" if rng.random() < 0.7 else "how many {} are in the image?"
            out.append((template.format(_plural(s)), "how many", "number", str(n), n > 3))
        return out
    if kind == "marker":
        for o in _unique(objs, lambda o: (o.size, o.color, o.shape)):
            if o.marker is not None:
                template = (
                    "what number is on the {}?" if rng.random() < 0.6 else "what number is written on the {}?"
                )
                out.append((template.format(o.describe()), "what number is", "digit", str(o.marker), True))
        return out
    if kind == "color":
        for o in _unique(objs, lambda o: (o.size, o.shape)):
            if rng.random() < 0.7:
                out.append(
                    (
                        f"what color is the {o.size} {o.shape}?",
                        "what color is the",
                        "color",
                        o.color,
                        o.size == "tiny",
                    )
                )
            else:
                out.append(
                    (
                        f"what is the color of the {o.size} {o.shape}?",
                        "what is the color of the",
                        "color",
                        o.color,
                        o.size == "tiny",
                    )
                )
        return out
    if kind == "shape":
        for o in _unique(objs, lambda o: (o.size, o.color)):
            if rng.random() < 0.7:
                out.append(
                    (
                        f"what shape is the {o.size} {o.color} object?",
                        "what",
                        "shape",
                        o.shape,
                        o.size == "tiny",
                    )
                )
            else:
                out.append(
                    (
                        f"what is the shape of the {o.size} {o.color} object?",
                        "what is the",
                        "shape",
                        o.shape,
                        o.size == "tiny",
                    )
                )
        return out
    if kind == "side":
        for o in _unique(objs, lambda o: (o.size, o.color, o.shape)):
            if abs(o.x - 0.5) > 0.12:
                side = "left" if o.x < 0.5 else "right"
                tail = "on the left or the right?" if rng.random() < 0.6 else "on the left or right side?"
                out.append((f"is the {o.describe()} {tail}", "is the", "side", side, o.size == "tiny"))
        return out
    raise ValueError(f"unknown question kind {kind!r}")


def questions_for(
    scene: Scene, rng: np.random.Generator | random.Random, n: int = 3
) -> list[SyntheticQuestion]:
    """`n` distinct questions about `scene` (fewer only if the scene supports fewer), kinds drawn by weight
    (~30% yes/no with a fair coin for the answer, ~30% number, ~40% other), each with ten human answers.
    Questions about tiny shapes and digits are preferred, so that resolution matters."""
    rng = as_generator(rng)
    pools: dict[str, list] = {}
    for kind in _QUESTION_KINDS:
        pool = _candidates(scene, kind, rng)
        if pool:
            # Random order, but questions that need the small details tend to come first (popped last).
            keys = rng.random(len(pool)) + 0.5 * np.array([hard for *_, hard in pool])
            pools[kind] = [pool[i] for i in np.argsort(keys, kind="stable")]
    chosen: list[SyntheticQuestion] = []
    seen: set[str] = set()
    while len(chosen) < n and pools:
        kinds = sorted(pools)
        weights = np.array([_QUESTION_KINDS[k][0] for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        pool = pools[kind]
        index = len(pool) - 1
        if _QUESTION_KINDS[kind][1] == "yes/no":  # a fair coin decides, so "yes" is never a free answer
            wanted = "yes" if rng.random() < 0.5 else "no"
            index = max((i for i, c in enumerate(pool) if c[3] == wanted), default=index)
        question, question_type, answer_kind, answer, hard = pool.pop(index)
        if not pools[kind]:
            del pools[kind]
        if question in seen:
            continue
        seen.add(question)
        answers = _human_answers(answer_kind, answer, rng, hard)
        chosen.append(SyntheticQuestion(question, answers, _QUESTION_KINDS[kind][1], question_type, answer))
    return chosen


def _pick(rng: np.random.Generator, options: Sequence[tuple[str, float]]) -> str:
    p = np.array([w for _, w in options])
    return options[int(rng.choice(len(options), p=p / p.sum()))][0]


def _surface(kind: str, value: str, rng: np.random.Generator) -> str:
    """One person's way of writing `value` (case, punctuation, number words, articles, shades)."""
    if kind == "yesno":
        extra = "yeah" if value == "yes" else "nope"
        return _pick(rng, [(value, 0.8), (value.capitalize(), 0.1), (value + ".", 0.05), (extra, 0.05)])
    if kind in ("number", "digit"):
        n = int(value)
        options = [(value, 0.7), (value + ".", 0.05)]
        if n < len(NUMBER_WORDS):
            options += [(NUMBER_WORDS[n], 0.15), (NUMBER_WORDS[n].capitalize(), 0.05)]
        if kind == "digit":
            options.append((f"number {value}", 0.1))
        if n == 0:
            options.append(("none", 0.1))
        return _pick(rng, options)
    if kind == "color":
        options = [(value, 0.75), (value.capitalize(), 0.08), (value + ".", 0.05)]
        if value not in ("white", "black"):
            options.append((f"{_COLOR_SHADES[int(rng.integers(len(_COLOR_SHADES)))]} {value}", 0.12))
        return _pick(rng, options)
    if kind == "shape":
        options = [
            (value, 0.7),
            (f"{_article(value)} {value}", 0.15),
            (value.capitalize(), 0.05),
            (value + ".", 0.05),
        ]
        if value == "circle":
            options.append(("round", 0.05))
        return _pick(rng, options)
    if kind == "side":
        return _pick(
            rng,
            [
                (value, 0.6),
                (value.capitalize(), 0.05),
                (f"the {value}", 0.1),
                (f"on the {value}", 0.1),
                (f"{value} side", 0.1),
                (f"to the {value}", 0.05),
            ],
        )
    raise ValueError(f"unknown answer kind {kind!r}")


def _wrong(kind: str, value: str, rng: np.random.Generator) -> str:
    """A plausible mistake: the other yes/no, a count off by one, a similar colour, shape or digit."""
    if kind == "yesno":
        wrong = "no" if value == "yes" else "yes"
    elif kind == "number":
        n = int(value)
        wrong = str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    elif kind == "digit":
        options = _CONFUSABLE_DIGITS[int(value)]
        wrong = str(options[int(rng.integers(len(options)))])
    elif kind == "color":
        options = _CONFUSABLE_COLORS[value]
        wrong = options[int(rng.integers(len(options)))]
    elif kind == "shape":
        options = _CONFUSABLE_SHAPES[value]
        wrong = options[int(rng.integers(len(options)))]
    elif kind == "side":
        wrong = (
            "right" if value == "left" and rng.random() < 0.7 else "left" if value == "right" else "middle"
        )
    else:
        raise ValueError(f"unknown answer kind {kind!r}")
    if kind in ("shape", "side"):
        return wrong
    return _surface(kind, wrong, rng) if kind != "digit" else wrong


def _alternatives(kind: str, value: str) -> list[str]:
    """What the people who disagree write on a contested question (none normalises to `value`)."""
    if kind == "yesno":
        options = ["no", "nope"] if value == "yes" else ["yes", "yeah"]
    elif kind == "number":
        options = [str(m) for m in range(int(value) - 2, int(value) + 3) if m >= 0 and m != int(value)]
    elif kind == "digit":
        d = int(value)
        options = [str(c) for c in _CONFUSABLE_DIGITS[d]] + [str(c) for c in (d - 1, d + 1) if 0 < c < 10]
        options.append(f"number {value}")
    elif kind == "color":
        options = [c for c in COLORS if c != value] + [f"{shade} {value}" for shade in _COLOR_SHADES]
    elif kind == "shape":
        options = [s for s in SHAPES if s != value] + ["oval", "rectangle", "octagon"]
    elif kind == "side":
        other = "right" if value == "left" else "left"
        options = [other, "middle", f"{value} side", f"on the {value}", f"to the {value}"]
    else:
        raise ValueError(f"unknown answer kind {kind!r}")
    return [a for a in options if _normalise(a) != value]


def _normalise(answer: str) -> str:
    """A rough VQA-style normalisation (lowercase, no trailing period, no articles, digits for number words),
    only used here to keep the true answer the humans' plurality; scoring uses knobsweep.metrics."""
    words = answer.lower().strip().rstrip(".").split()
    words = [
        str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else "0" if w == "none" else w
        for w in words
        if w not in ("a", "an", "the")
    ]
    return " ".join(words)


def _human_answers(kind: str, value: str, rng: np.random.Generator, hard: bool) -> list[str]:
    """Ten answers: often unanimous, usually surface variants plus a few mistakes (more when hard), and
    sometimes contested, with the true answer only a small plurality (as for many real VQA questions)."""
    u = rng.random()
    if u < 0.3:  # about a third of real VQA questions get ten identical answers
        return [value] * 10
    if u > (0.75 if hard else 0.88):  # contested: only 2-4 write the true answer, the rest scatter
        k = int(rng.integers(2, 5))
        alternatives = _alternatives(kind, value)
        answers = [value] * k
        counts: Counter[str] = Counter()
        for a in (alternatives[i] for i in rng.integers(len(alternatives) or 1, size=40) if alternatives):
            if len(answers) == 10:
                break
            if counts[_normalise(a)] < k - 1:
                counts[_normalise(a)] += 1
                answers.append(a)
        answers += [value] * (10 - len(answers))  # too few distinct alternatives: more people agree
        answers = [answers[i] for i in rng.permutation(10)]
    else:
        p_wrong = 0.22 if hard else 0.07
        answers = [
            _wrong(kind, value, rng) if rng.random() < p_wrong else _surface(kind, value, rng)
            for _ in range(10)
        ]
    # The true answer must stay the plurality (as multiple_choice_answer is in the real data).
    while True:
        counts = Counter(_normalise(a) for a in answers)
        if all(c < counts[value] for a, c in counts.items() if a != value):
            return answers
        wrong = [i for i, a in enumerate(answers) if _normalise(a) != value]
        answers[wrong[int(rng.integers(len(wrong)))]] = value


# ---------------------------------------------------------------------------------------------------
# Captions

_POSITIONS = {  # (column, row) -> phrase after "near the"
    ("left", "top"): "top left corner",
    ("right", "top"): "top right corner",
    ("left", "bottom"): "bottom left corner",
    ("right", "bottom"): "bottom right corner",
    ("center", "top"): "top",
    ("center", "bottom"): "bottom",
    ("left", "middle"): "left side",
    ("right", "middle"): "right side",
    ("center", "middle"): "middle",
}
_CAPTION_TEMPLATES = (
    "{Groups} on a {bg} background.",
    "A {bg} background with {groups}.",
    "There are {n} shapes on a {bg} background, including {groups}.",
    "An image of {groups} scattered across a {bg} surface.",
    "Several colorful shapes on a {bg} background, such as {groups}.",
    "A picture showing {groups} on a {bg} floor.",
    "{Groups}, with the {desc} near the {pos}.",
    "{N} shapes lie on a {bg} surface, and the {desc} is near the {pos}.",
)


def _position(o: SceneObject) -> str:
    col = "left" if o.x < 1 / 3 else "right" if o.x > 2 / 3 else "center"
    row = "top" if o.y < 1 / 3 else "bottom" if o.y > 2 / 3 else "middle"
    return _POSITIONS[(col, row)]


def _group_phrase(count: int, size: str, color: str, shape: str, marker: int | None) -> str:
    if count == 1:
        phrase = f"{_article(size)} {size} {color} {shape}"
        return phrase + (f" with the number {marker} on it" if marker is not None else "")
    return f"{_number(count)} {size} {color} {_plural(shape)}"


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _n_words(text: str) -> int:
    return sum(t.isalnum() for t in tokenize_words(text))


def captions_for(scene: Scene, rng: np.random.Generator | random.Random, n: int = 5) -> list[str]:
    """`n` reference captions of ~15-25 words in varied wording; each mentions a different subset of the
    shapes (grouped by size, colour and shape, with counts), often the background and a position."""
    rng = as_generator(rng)
    objs = scene.objects
    groups = Counter((o.size, o.color, o.shape) for o in objs)
    markers = {(o.size, o.color, o.shape): o.marker for o in objs if groups[(o.size, o.color, o.shape)] == 1}
    phrases = [_group_phrase(c, *key, markers.get(key)) for key, c in sorted(groups.items())]
    unique = _unique(objs, lambda o: (o.size, o.color, o.shape)) or list(objs)
    templates = [_CAPTION_TEMPLATES[i] for i in rng.permutation(len(_CAPTION_TEMPLATES))]
    captions = []
    for i in range(n):
        template = templates[i % len(templates)]
        order = [phrases[j] for j in rng.permutation(len(phrases))]
        target = unique[int(rng.integers(len(unique)))]
        number = _number(len(objs))
        fields = {"bg": scene.background, "n": number, "N": number.capitalize(), "desc": target.describe(),
                  "pos": _position(target)}  # fmt: skip

        def fill(k: int, template=template, order=order, fields=fields) -> str:
            g = _join(order[:k])
            return template.format(groups=g, Groups=g[0].upper() + g[1:], **fields)

        # The most shapes that keep the caption within 25 words (at least one).
        k = max([k for k in range(1, len(order) + 1) if _n_words(fill(k)) <= 25] or [1])
        caption = fill(k)
        if _n_words(caption) < 15 and "{desc}" not in template:
            caption = caption[:-1] + f", and the {target.describe()} is near the {_position(target)}."
        captions.append(caption)
    return captions


# ---------------------------------------------------------------------------------------------------
# Vocabulary


def _vocabulary() -> list[str]:
    words: set[str] = set()
    for template in (*_CAPTION_TEMPLATES, *(d.template for d in prompts.DEFAULTS.values())):
        words.update(tokenize_words(re.sub(r"\{\w+\}", " ", template)))
    fixed = (
        "is there a an are any how many in the picture image what number written on color of shape object "
        "left or right side to yes no yeah nope none middle with it and near is round top bottom corner"
    )
    words.update(fixed.split())
    words.update(
        COLORS, SHAPES, (_plural(s) for s in SHAPES), SIZES, BACKGROUNDS, NUMBER_WORDS, _COLOR_SHADES
    )
    words.update(w for options in _CONFUSABLE_SHAPES.values() for w in options)
    words.update(str(i) for i in range(21))
    words.update(w for p in _POSITIONS.values() for w in p.split())
    # Sentence-initial and answer words also occur capitalised ("A", "Yes", "Red."): listing those forms
    # lets a word-level tokenizer that does not lowercase cover the text too.
    starts = {tokenize_words(t)[0] for t in _CAPTION_TEMPLATES if not t.startswith("{")}
    words.update(
        w.capitalize()
        for w in (
            *starts,
            "a",
            "an",
            *NUMBER_WORDS,
            "yes",
            "no",
            *COLORS,
            *SHAPES,
            "left",
            "right",
            "answer",
            "provide",
        )
    )
    words.update(("?", ".", ",", "-"))
    return sorted(words)


VOCABULARY: list[str] = _vocabulary()


# ---------------------------------------------------------------------------------------------------
# Writing a dataset in the real file formats

_VQA_INFO = {
    "description": "Synthetic shapes in the format of VQA v2 (knobsweep)",
    "url": "",
    "version": "2.0",
    "year": 2026,
    "contributor": "knobsweep",
    "date_created": "2026-01-01 00:00:00",
}
_VQA_LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 International License",
}
_COCO_INFO = {
    "description": "Synthetic shapes in the format of COCO 2014 captions (knobsweep)",
    "url": "",
    "version": "1.0",
    "year": 2026,
    "contributor": "knobsweep",
    "date_created": "2026/01/01",
}
_COCO_LICENSES = [
    {
        "url": "http://creativecommons.org/licenses/by/4.0/",
        "id": 1,
        "name": "Creative Commons Attribution 4.0 International License",
    }
]


def image_file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    n_images: int,
    seed: int,
    questions_per_image: int = 3,
    captions_per_image: int = 5,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
    jpeg_quality: int = 92,
) -> dict[str, Path]:
    """Write `n_images` scenes with their questions and captions in the real VQA v2 / COCO formats.

    Layout under `out_dir`: vqa/v2_OpenEnded_mscoco_val2014_questions.json,
    vqa/v2_mscoco_val2014_annotations.json, coco/annotations/captions_val2014.json,
    coco/dataset_coco.json (Karpathy format: every 4th image "val", the rest "test") and
    images/val2014/COCO_val2014_%012d.jpg. Each image's (width, height) is drawn from `image_sizes`
    (default: 4:3, 3:4, 16:9 and 1:1, each at least the largest budget's ~1.9 MP). Image ids are sparse,
    question ids follow VQA's image_id * 1000 + k. Same arguments, same bytes. Returns the paths under the keys vqa_questions, vqa_annotations, coco_captions, karpathy_split, image_dir.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not image_sizes:
        raise ValueError("image_sizes is empty")
    out = Path(out_dir)
    paths = {
        "vqa_questions": out / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json",
        "vqa_annotations": out / "vqa" / "v2_mscoco_val2014_annotations.json",
        "coco_captions": out / "coco" / "annotations" / "captions_val2014.json",
        "karpathy_split": out / "coco" / "dataset_coco.json",
        "image_dir": out / "images" / "val2014",
    }
    for p in paths.values():
        (p if p.suffix == "" else p.parent).mkdir(parents=True, exist_ok=True)

    master = np.random.default_rng(seed)
    # Sparse ids like the real ones, so nothing may assume they are contiguous.
    image_ids = sorted(int(i) for i in master.choice(np.arange(1, 600_000), size=n_images, replace=False))
    questions, annotations, images, captions, karpathy = [], [], [], [], []
    caption_id = sentence_id = 0
    for index, image_id in enumerate(image_ids):
        rng = np.random.default_rng([seed, image_id])
        width, height = image_sizes[int(rng.integers(len(image_sizes)))]
        scene = render_scene(rng, width=width, height=height)
        file_name = image_file_name(image_id)
        scene.image.save(paths["image_dir"] / file_name, format="JPEG", quality=jpeg_quality)
        for k, q in enumerate(questions_for(scene, rng, n=questions_per_image)):
            question_id = image_id * 1000 + k  # the VQA v2 convention
            questions.append({"image_id": image_id, "question": q.question, "question_id": question_id})
            annotations.append(
                {
                    "question_type": q.question_type,
                    "multiple_choice_answer": q.canonical_answer,
                    "answers": [
                        {
                            "answer": a,
                            "answer_confidence": _confidence(a, q.canonical_answer, rng),
                            "answer_id": j + 1,
                        }
                        for j, a in enumerate(q.answers)
                    ],
                    "image_id": image_id,
                    "answer_type": q.answer_type,
                    "question_id": question_id,
                }
            )
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": height,
                "width": width,
                "date_captured": "2026-01-01 00:00:00",
                "flickr_url": "",
                "id": image_id,
            }
        )
        sentences = []
        for text in captions_for(scene, rng, n=captions_per_image):
            caption_id += 1
            captions.append({"image_id": image_id, "id": caption_id, "caption": text})
            sentences.append(
                {
                    "tokens": [t for t in tokenize_words(text) if t.isalnum()],
                    "raw": text,
                    "imgid": index,
                    "sentid": sentence_id,
                }
            )
            sentence_id += 1
        karpathy.append(
            {
                "filepath": "val2014",
                "sentids": [s["sentid"] for s in sentences],
                "filename": file_name,
                "imgid": index,
                "split": "val" if index % 4 == 0 else "test",
                "sentences": sentences,
                "cocoid": image_id,
            }
        )

    _write_json(
        paths["vqa_questions"],
        {
            "info": _VQA_INFO,
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": _VQA_LICENSE,
            "data_subtype": "val2014",
            "questions": questions,
        },
    )
    _write_json(
        paths["vqa_annotations"],
        {
            "info": _VQA_INFO,
            "license": _VQA_LICENSE,
            "data_subtype": "val2014",
            "annotations": annotations,
            "data_type": "mscoco",
        },
    )
    _write_json(
        paths["coco_captions"],
        {"info": _COCO_INFO, "images": images, "licenses": _COCO_LICENSES, "annotations": captions},
    )
    _write_json(paths["karpathy_split"], {"images": karpathy, "dataset": "coco"})
    return paths


def _confidence(answer: str, canonical: str, rng: np.random.Generator) -> str:
    p_yes = 0.9 if _normalise(answer) == canonical else 0.5
    u = rng.random()
    return "yes" if u < p_yes else "maybe" if u < p_yes + (1 - p_yes) * 0.7 else "no"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
