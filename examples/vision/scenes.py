"""Drawn scenes for the vision tasks: coloured shapes and rendered text on plain backgrounds.

Each task is a pure function of a `random.Random` and the image size, so one seed fixes the
whole dataset. Shapes are drawn without anti-aliasing: a shape's pixels are exactly its palette
colour and the background is one flat colour, which keeps every answer checkable from the
pixels. Backgrounds are greys (slightly tinted) so that no background could be taken for a
named colour; each shape or text colour is far enough from its background to stand out.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {
    "red": (230, 25, 25), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (245, 215, 30), "orange": (245, 130, 20), "purple": (140, 50, 170),
    "black": (0, 0, 0), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
THIRDS = ("left", "centre", "right")
# Euclidean RGB distance between a colour and its background: red on mid grey is ~180,
# green on mid grey ~130, which is visible but weak, so it is not allowed.
MIN_CONTRAST = 150
TINT = 12  # how far a background's channels may stray from grey
# O and I read as 0 and 1 in the default font; the digits keep those shapes.
OCR_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
MIN_SIZE = 48  # below this, text in cells of a quarter of the width is no longer legible
OCR_COLUMNS = 4  # character cells a line
OCR_MAX_LENGTH = 6  # two lines: 4 characters, then 2

QUESTIONS = {
    "colour": ["What colour is the shape?", "What is the colour of the shape?",
               "Which colour is the shape in this image?", "Name the colour of the shape."],
    "shape": ["What shape is this?", "Which shape is in the image?",
              "Is this a circle, a square or a triangle?", "Name the shape in the image."],
    "position": ["Where is the shape: left, centre or right?",
                 "Is the shape on the left, in the centre or on the right?",
                 "In which third of the image is the shape: left, centre or right?"],
    "count": ["How many shapes are there?", "How many shapes are in the image?",
              "Count the shapes in the image."],
    "ocr": ["What does the text say?", "Read the text in the image.",
            "What is written in the image?"],
    "compare-colour": ["Which image has the {colour} shape, the first or the second?",
                       "In which image is the shape {colour}: the first or the second?"],
    "compare-count": ["Which image has more shapes, the first or the second?",
                      "Which of the two images shows more shapes: the first or the second?"],
    "compare-shape": ["Which image has a {shape}, the first or the second?",
                      "In which image is there a {shape}: the first or the second?"],
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, in pixels
    y: float
    r: float  # half the side of its bounding box
    turn: float = 0.0  # degrees; only a triangle turns (a turned square reads as a diamond)


@dataclass(frozen=True)
class Example:
    images: list[Image.Image]
    question: str
    answer: str
    reply: str = ""  # the assistant's whole reply where it says more than the answer


def contrasts(colour: RGB, background: RGB) -> bool:
    return math.dist(colour, background) >= MIN_CONTRAST


def random_background(rng: random.Random) -> RGB:
    grey = rng.randrange(256)
    return tuple(min(255, max(0, grey + rng.randint(-TINT, TINT))) for _ in range(3))


def background_for(rng: random.Random, colour: str) -> RGB:
    """A background that `colour` stands out on (every colour has a wide range of them)."""
    while True:
        background = random_background(rng)
        if contrasts(PALETTE[colour], background):
            return background


def visible_colours(background: RGB) -> list[str]:
    """The palette colours that stand out on `background`: never empty, as black stands out
    on every grey lighter than about 90 and white on every grey darker than about 165."""
    return [name for name, rgb in PALETTE.items() if contrasts(rgb, background)]


def place(rng: random.Random, size: int, radii: list[float],
          x_range: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """Centres for shapes of the given radii, inside the image (and inside `x_range`, if given)
    with a margin, their bounding boxes apart by a gap, so no two shapes touch."""
    margin = max(2.0, size / 32)
    left, right = x_range or (0, size)
    for _ in range(1000):
        centres: list[tuple[float, float]] = []
        for r in radii:
            x = rng.uniform(left + margin + r, right - margin - r)
            y = rng.uniform(margin + r, size - margin - r)
            if all(max(abs(x - cx), abs(y - cy)) >= r + cr + margin
                   for (cx, cy), cr in zip(centres, radii)):
                centres.append((x, y))
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"could not place {len(radii)} shapes in {size}x{size} pixels")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    fill = PALETTE[shape.colour]
    x, y, r = shape.x, shape.y, shape.r
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.regular_polygon((x, y, r), 3, rotation=shape.turn, fill=fill)


def scene(size: int, background: RGB, shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def random_shape(rng: random.Random, kind: str, colour: str, x: float, y: float,
                 r: float) -> Shape:
    return Shape(kind, colour, x, y, r, rng.uniform(0, 360) if kind == "triangle" else 0.0)


def lone_shape(rng: random.Random, size: int, kind: str, colour: str) -> Image.Image:
    """One large shape anywhere in the image, on a background it stands out on."""
    r = rng.uniform(0.15, 0.3) * size
    [(x, y)] = place(rng, size, [r])
    return scene(size, background_for(rng, colour), [random_shape(rng, kind, colour, x, y, r)])


def many_shapes(rng: random.Random, size: int, n: int) -> Image.Image:
    """`n` small shapes of any kinds and visible colours, none touching another."""
    background = random_background(rng)
    colours = visible_colours(background)
    radii = [rng.uniform(0.07, 0.12) * size for _ in range(n)]
    shapes = [random_shape(rng, rng.choice(SHAPES), rng.choice(colours), x, y, r)
              for (x, y), r in zip(place(rng, size, radii), radii)]
    return scene(size, background, shapes)


def colour_task(rng: random.Random, size: int) -> Example:
    colour = rng.choice(list(PALETTE))
    image = lone_shape(rng, size, rng.choice(SHAPES), colour)
    return Example([image], rng.choice(QUESTIONS["colour"]), colour)


def shape_task(rng: random.Random, size: int) -> Example:
    kind = rng.choice(SHAPES)
    image = lone_shape(rng, size, kind, rng.choice(list(PALETTE)))
    return Example([image], rng.choice(QUESTIONS["shape"]), kind)


def position_task(rng: random.Random, size: int) -> Example:
    """One shape wholly inside the left, centre or right third of the image."""
    third = rng.randrange(3)
    colour = rng.choice(list(PALETTE))
    r = rng.uniform(0.06, 0.12) * size  # small enough to fit a third of a 48-pixel image
    [(x, y)] = place(rng, size, [r], (third * size / 3, (third + 1) * size / 3))
    shape = random_shape(rng, rng.choice(SHAPES), colour, x, y, r)
    image = scene(size, background_for(rng, colour), [shape])
    return Example([image], rng.choice(QUESTIONS["position"]), THIRDS[third])


def count_task(rng: random.Random, size: int) -> Example:
    n = rng.randint(1, 5)
    return Example([many_shapes(rng, size, n)], rng.choice(QUESTIONS["count"]), str(n))


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font (no font file needed) at `size` pixels."""
    return ImageFont.load_default(size=size)


def text_image(rng: random.Random, size: int, text: str) -> Image.Image:
    """`text` on a grid of OCR_COLUMNS character cells a line, as a character display sets it:
    the first OCR_COLUMNS characters on the line above the middle, the rest on the line below,
    each centred in its cell (16 pixels square in a 64-pixel image), the whole block shifted
    by a pixel or two. A cell is then exactly what one of vlm-small's image tokens sees
    (8-pixel patches, 2 x 2 to a token), and the n-th character is the n-th token of the
    middle rows in reading order: the decoder reads the text by looking a fixed distance back.
    Text on one line in cells of 12 pixels, each character spread over two to four tokens, had
    a character error rate of 49% after 600 steps of reading alone; at a random place and
    size, in a proportional font, 97% after a 20-minute run of the whole mix."""
    background = random_background(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = max(2, size // 32)
    cell = size // OCR_COLUMNS
    glyphs = font(cell - 2 * margin)  # W, the widest glyph, as wide: 2 pixels either side
    _, top, _, bottom = draw.textbbox((0, 0), OCR_ALPHABET, font=glyphs)
    # every glyph stays inside its cell: the block shifts half as far across as up or down
    dx, dy = rng.randint(-margin // 2, margin // 2), rng.randint(-margin, margin)
    colour = PALETTE[rng.choice(visible_colours(background))]
    first_row = OCR_COLUMNS // 2 - 1  # the square grid's two middle rows
    for i, char in enumerate(text):
        row, column = divmod(i, OCR_COLUMNS)
        x = (column + 0.5) * cell + dx
        y = (first_row + row + 0.5) * cell - (top + bottom) / 2 + dy
        draw.text((x, y), char, font=glyphs, fill=colour, anchor="ma")
    return image


def ocr_task(rng: random.Random, size: int) -> Example:
    text = "".join(rng.choices(OCR_ALPHABET, k=rng.randint(3, OCR_MAX_LENGTH)))
    return Example([text_image(rng, size, text)], rng.choice(QUESTIONS["ocr"]), text)


def compare_task(rng: random.Random, size: int) -> Example:
    """Two images, one of which has what the question asks about: a colour, a shape, or more
    shapes than the other. The reply says what each image shows, then answers after a colon:
    "the blue first, the red second: red second", "first 3, second 5: second". A 20-minute run
    matched a question's colour to one of two images no better than chance, yet names the
    colour or shape of each nearly always; written this way, the answer names the thing asked
    about and then copies the word that followed it in the reply, and the count is a
    comparison of numbers."""
    first = rng.random() < 0.5
    # colours drawn twice as often: eight of them to find in the reply, against three shapes
    asked = rng.choices(("colour", "shape", "count"), weights=(2, 1, 1))[0]
    if asked == "colour":
        colour, other = rng.sample(list(PALETTE), 2)
        kinds = [rng.choice(SHAPES) for _ in range(2)]
        images = [lone_shape(rng, size, k, c) for k, c in zip(kinds, (colour, other))]
        seen, fields = [colour, other], {"colour": colour}
    elif asked == "shape":
        kind, other = rng.sample(SHAPES, 2)
        images = [lone_shape(rng, size, k, rng.choice(list(PALETTE))) for k in (kind, other)]
        seen, fields = [kind, other], {"shape": kind}
    else:
        more, fewer = sorted(rng.sample(range(1, 6), 2), reverse=True)
        images = [many_shapes(rng, size, n) for n in (more, fewer)]
        seen, fields = [str(more), str(fewer)], {}
    if not first:
        images.reverse()
        seen.reverse()
    question = rng.choice(QUESTIONS[f"compare-{asked}"]).format(**fields)
    which = "first" if first else "second"
    if asked == "count":
        return Example(images, question, which, f"first {seen[0]}, second {seen[1]}: {which}")
    # The ordinal right after the name, as in the description before it: the word that
    # followed the name there is the answer, a plain copy (with a colon between the name and
    # the ordinal instead, one seed answered 68.5% of the comparisons and another 100%).
    # "the" puts a space before each name, so that all three are one and the same token.
    answer = f"{seen[0] if first else seen[1]} {which}"
    return Example(images, question, answer,
                   f"the {seen[0]} first, the {seen[1]} second: {answer}")


TASKS = {"colour": colour_task, "shape": shape_task, "position": position_task,
         "count": count_task, "ocr": ocr_task, "compare": compare_task}
