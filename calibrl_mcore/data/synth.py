"""Synthetic visual reasoning tasks, drawn with PIL, for end-to-end runs with tiny models.

    calibrl data synth --out DIR --n N [--seed S] [--expert-noise p] [--heldout N_EVAL] [--image-size 56]

Every answer needs the image (the question alone does not determine it), numbers are small and the
expert solutions are one short line, so that a tiny random-init model can learn to imitate and then
improve on them within a CPU demo. Task kinds and their answers:

- `count`:    "How many red circles are there?"            -> integer 1..4
- `bars`:     "Which bar is tallest? Answer with the letter." (or shortest) -> letter A..D
- `clock`:    "What hour does the clock show?" (hour hand only, a red dot marks 12) -> integer 1..12
- `triangle`: two base angles printed, "Find the third angle in degrees." -> integer (multiple of 10)

Output: `DIR/train.jsonl` (n rows) and `DIR/eval.jsonl` (`heldout` rows, generated from their own stream,
so changing one never changes the other), PNGs in `DIR/images/` referenced by relative paths, and
`DIR/README.json` (counts per kind, seed, settings). Byte-identical for the same arguments.

`expert_noise=p` replaces the expert of round(p * n) *training* rows by a confident wrong solution (wrong
final answer; `meta.expert_corrupted = true`) to study the "weak or noisy experts" limitation of CalibRL.
Eval rows keep clean experts: they are only a reference there.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["TASK_KINDS", "generate_synthetic", "main"]

TASK_KINDS = ("count", "bars", "clock", "triangle")
GENERATOR_VERSION = 1
"""Bump when the drawing or the texts change, so that README.json tells data sets apart."""

_WHITE, _BLACK, _GREY = (255, 255, 255), (0, 0, 0), (90, 90, 90)
_COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 150, 40)}
_SHAPES = ("circle", "square", "triangle")
_LETTERS = "ABCD"


@dataclass
class _Task:
    """One drawn problem; `think(answer)` writes the expert's reasoning for a claimed answer, so that a
    corrupted expert reads exactly like a clean one with a wrong conclusion."""

    image: Image.Image
    question: str
    answer: str
    think: Callable[[str], str]
    wrong_answers: list[str]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at a size readable in a `size`-pixel image (no system fonts needed)."""
    return ImageFont.load_default(size=max(7, round(size * 0.18)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)


def _task_count(rng: random.Random, size: int) -> _Task:
    """Shapes on a grid (one per cell, so none overlap); count one (colour, shape) combination."""
    grid = 3 if size < 80 else 4
    cell = size / grid
    color, shape = rng.choice(list(_COLORS)), rng.choice(_SHAPES)
    target = rng.randint(1, 4)
    distractors = rng.randint(1, min(4, grid * grid - target))
    others = [(c, s) for c in _COLORS for s in _SHAPES if (c, s) != (color, shape)]
    items = [(color, shape)] * target + [rng.choice(others) for _ in range(distractors)]
    cells = rng.sample(range(grid * grid), len(items))
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    r = cell * 0.32
    for (c, s), k in zip(items, cells):
        jitter = cell * 0.08
        cx = (k % grid + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (k // grid + 0.5) * cell + rng.uniform(-jitter, jitter)
        _draw_shape(draw, s, cx, cy, r, _COLORS[c])

    def think(ans: str) -> str:
        return f"{ans} {color} {shape}{'' if ans == '1' else 's'}"

    wrong = [str(v) for v in (target - 1, target + 1) if v >= 1]
    return _Task(img, f"How many {color} {shape}s are there?", str(target), think, wrong)


def _task_bars(rng: random.Random, size: int) -> _Task:
    """3-4 bars of distinct integer heights, lettered A.. underneath; ask for the tallest or shortest."""
    n = rng.choice((3, 4))
    heights = rng.sample(range(1, 7), n)
    tallest = rng.random() < 0.5
    pick = heights.index(max(heights) if tallest else min(heights))
    font = _font(size)
    label_h = font.getbbox("A")[3] + 2
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    base_y, top_y = size - label_h - 1, 2
    unit = (base_y - top_y) / 6
    slot = size / n
    for i, h in enumerate(heights):
        x0, x1 = i * slot + slot * 0.2, (i + 1) * slot - slot * 0.2
        draw.rectangle((x0, base_y - h * unit, x1, base_y), fill=(40, 90, 200))
        draw.text(((x0 + x1) / 2, base_y + 1), _LETTERS[i], fill=_BLACK, font=font, anchor="mt")
    draw.line((0, base_y, size, base_y), fill=_GREY)
    word = "tallest" if tallest else "shortest"
    listing = " ".join(f"{_LETTERS[i]}={h}" for i, h in enumerate(heights))

    def think(ans: str) -> str:
        return f"{listing}, {word} {ans}"

    wrong = [_LETTERS[i] for i in range(n) if i != pick]
    return _Task(img, f"Which bar is {word}? Answer with the letter.", _LETTERS[pick], think, wrong)


def _task_clock(rng: random.Random, size: int) -> _Task:
    """A clock face with 12 ticks, a red dot at 12 (orientation) and only an hour hand on the hour."""
    hour = rng.randint(1, 12)
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    c, rad = size / 2, size / 2 - 2
    draw.ellipse((c - rad, c - rad, c + rad, c + rad), outline=_BLACK, width=max(1, size // 28))
    for k in range(12):
        a = math.radians(k * 30)
        inner = rad * (0.72 if k % 3 == 0 else 0.82)
        draw.line(
            (c + inner * math.sin(a), c - inner * math.cos(a), c + rad * math.sin(a), c - rad * math.cos(a)),
            fill=_GREY,
            width=1,
        )
    dot = max(1.5, size / 28)
    draw.ellipse((c - dot, c - rad * 0.6 - dot, c + dot, c - rad * 0.6 + dot), fill=_COLORS["red"])
    a = math.radians(hour * 30)  # 0 degrees = 12 o'clock, clockwise (image y grows downwards)
    hand = rad * 0.55
    draw.line((c, c, c + hand * math.sin(a), c - hand * math.cos(a)), fill=_BLACK, width=max(2, size // 18))

    def think(ans: str) -> str:
        return f"hand at {ans}"

    wrong = [str((hour + d - 1) % 12 + 1) for d in (-1, 1)]
    return _Task(img, "What hour does the clock show?", str(hour), think, wrong)


def _task_triangle(rng: random.Random, size: int) -> _Task:
    """A triangle with two base angles printed under their vertices and a "?" over the apex; drawn to scale
    unless stretched to fit. Angles are multiples of 10 so the arithmetic stays small."""
    a = rng.randrange(30, 90, 10)
    b = rng.randrange(30, min(90, 150 - a) + 1, 10)
    third = 180 - a - b
    # Unit base A=(0,0), B=(1,0); law of sines: |AC| = sin(b) / sin(c), with sin(c) = sin(a + b).
    ac = math.sin(math.radians(b)) / math.sin(math.radians(a + b))
    apex = (ac * math.cos(math.radians(a)), ac * math.sin(math.radians(a)))
    font = _font(size)
    text_h = font.getbbox("0")[3] + 1
    left, right, top, bottom = 2, size - 2, text_h + 1, size - text_h - 2
    xs, ys = (0.0, 1.0, apex[0]), (0.0, 0.0, apex[1])
    # Fill the width (so the two base labels never collide); squash vertically only if too tall. Tall
    # triangles are thus stretched sideways: the printed numbers, not the drawing, carry the angles.
    sx = (right - left) / (max(xs) - min(xs))
    sy = min(sx, (bottom - top) / max(ys))
    # Vertices A, B, C in image coordinates (y grows downwards).
    pts = [(left + sx * (x - min(xs)), bottom - sy * y) for x, y in zip(xs, ys)]
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    draw.polygon(pts, outline=_BLACK, width=1)
    draw.text((pts[0][0], pts[0][1] + 1), str(a), fill=_COLORS["blue"], font=font, anchor="lt")
    draw.text((pts[1][0], pts[1][1] + 1), str(b), fill=_COLORS["blue"], font=font, anchor="rt")
    draw.text((pts[2][0], pts[2][1] - 1), "?", fill=_COLORS["red"], font=font, anchor="mb")

    def think(ans: str) -> str:
        return f"180-{a}-{b}={ans}"

    wrong = [str(third + d) for d in (-10, 10)]
    question = "Two angles of the triangle are labelled in degrees. Find the third angle in degrees."
    return _Task(img, question, str(third), think, wrong)


_GENERATORS: dict[str, Callable[[random.Random, int], _Task]] = {
    "count": _task_count,
    "bars": _task_bars,
    "clock": _task_clock,
    "triangle": _task_triangle,
}


def _expert(task: _Task, answer: str) -> str:
    return f"<think>{task.think(answer)}</think><answer>{answer}</answer>"


def _write_split(
    out_dir: Path, split_name: str, n: int, seed: int, image_size: int, kinds: Sequence[str], n_corrupt: int
) -> dict[str, Any]:
    """Draw and write one split; returns its README entry."""
    corrupt = set(random.Random(f"calibrl-synth/{seed}/{split_name}/noise").sample(range(n), n_corrupt))
    counts: Counter[str] = Counter()
    with (out_dir / f"{split_name}.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n):
            # One RNG per example: example i does not depend on n, so a larger run extends a smaller one.
            rng = random.Random(f"calibrl-synth/{seed}/{split_name}/{i}")
            kind = kinds[i % len(kinds)]
            task = _GENERATORS[kind](rng, image_size)
            rel = f"images/{split_name}-{i:06d}.png"
            task.image.save(out_dir / rel, format="PNG")
            claimed = rng.choice(task.wrong_answers) if i in corrupt else task.answer
            row = {
                "uid": f"synth-{split_name}-{i:06d}",
                "question": task.question,
                "images": [rel],
                "answer": task.answer,
                "solution": _expert(task, claimed),
                "meta": {"kind": kind, "expert_corrupted": i in corrupt, "split": split_name},
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[kind] += 1
    return {"n": n, "counts": {k: counts[k] for k in kinds}, "expert_corrupted": n_corrupt}


def generate_synthetic(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    expert_noise: float = 0.0,
    heldout: int | None = None,
    image_size: int = 56,
    kinds: Sequence[str] = TASK_KINDS,
) -> dict[str, Any]:
    """Write the synthetic data set (see the module docstring) and return its README.json content.

    `n` training rows, `heldout` eval rows (default: max(1, n // 10)), kinds in round-robin order.
    """
    heldout = max(1, n // 10) if heldout is None else heldout
    if n <= 0 or heldout < 0:
        raise ValueError(f"need n > 0 and heldout >= 0, got n={n} heldout={heldout}")
    if not 0.0 <= expert_noise <= 1.0:
        raise ValueError(f"expert_noise must be in [0, 1], got {expert_noise}")
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28 pixels to draw legible tasks, got {image_size}")
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown task kinds {unknown or kinds}; valid: {', '.join(TASK_KINDS)}")

    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in [*images.glob("train-*.png"), *images.glob("eval-*.png")]:
        stale.unlink()  # only our own names: a re-run with a smaller n must not leave orphans behind
    readme: dict[str, Any] = {
        "generator": "calibrl_mcore.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "expert_noise": expert_noise,
        "kinds": list(kinds),
        "splits": {
            "train": _write_split(out, "train", n, seed, image_size, kinds, round(expert_noise * n)),
            "eval": _write_split(out, "eval", heldout, seed, image_size, kinds, 0),
        },
    }
    (out / "README.json").write_text(json.dumps(readme, indent=2) + "\n", encoding="utf-8")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    """`calibrl data synth ...` (argv excludes the `data synth` words)."""
    parser = argparse.ArgumentParser(prog="calibrl data synth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", required=True, type=int, help="number of training rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expert-noise", type=float, default=0.0, help="fraction of corrupted train experts")
    parser.add_argument("--heldout", type=int, default=None, help="number of eval rows (default n // 10)")
    parser.add_argument("--image-size", type=int, default=56, help="image side in pixels")
    parser.add_argument("--kinds", nargs="+", default=list(TASK_KINDS), choices=TASK_KINDS)
    args = parser.parse_args(argv)
    readme = generate_synthetic(
        args.out,
        args.n,
        seed=args.seed,
        expert_noise=args.expert_noise,
        heldout=args.heldout,
        image_size=args.image_size,
        kinds=args.kinds,
    )
    splits = readme["splits"]
    print(
        f"wrote {splits['train']['n']} train / {splits['eval']['n']} eval rows to {args.out} "
        f"({splits['train']['expert_corrupted']} corrupted experts)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
