"""The offline demo dataset: generated scenes of coloured shapes with varied captions.

Each scene holds 1 to 3 shapes in distinct horizontal slots (left, middle, right),
each with its own colour, kind and size, on a lightly textured background. Every
attribute is drawn uniformly and independently, so no single caption fits many
images (the best constant caption scores low) while a model that sees colour, shape,
count and order can describe each image exactly.

Everything is a pure function of ``(seed, index)``: the same params give
byte-identical files, and image ``i`` is the same whatever the dataset size.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.core.files import write_json
from pipeline.core.params import DemoData
from pipeline.formats.records import split_for

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SLOTS = ("left", "middle", "right")
# Splits like the Karpathy COCO split, chosen per image from a hash of its key.
VAL_FRACTION = 0.05
TEST_FRACTION = 0.15
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges, exact fill
PHOTO_SIZE = (640, 480)  # style photo: COCO's most common image size
PHOTO_QUALITY = 90

# Wording variants: each caption picks one at random, so references differ in wording
# but never in content.
_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "square shape"),
    "triangle": ("triangle", "triangle", "triangular shape"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "large")}
_POS_ON = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_POS_AT = {"left": "at the left side", "middle": "at the center", "right": "at the right side"}
_POS_OF = {"left": "left of center", "middle": "in the center", "right": "right of center"}
_COUNT_WORDS = {2: "two", 3: "three"}
# A second wording of the colours, never used by the dataset's captions: the transfer
# experiment's domain B (pipeline/transfer) names the same colours with these words.
COLOUR_WORDS_B: dict[str, str] = {
    "red": "crimson",
    "green": "emerald",
    "blue": "navy",
    "yellow": "golden",
    "purple": "violet",
    "orange": "amber",
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    slot: str


@dataclass(frozen=True)
class Scene:
    index: int
    shapes: tuple[Shape, ...]  # ordered left to right
    background: int  # grey level of the background

    @property
    def key(self) -> str:
        return f"scene_{self.index:05d}"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # One independent stream per (seed, image, purpose): changing the captions per
    # image does not change the pictures.
    return np.random.default_rng([seed, index, stream])


def scene_for(index: int, seed: int) -> Scene:
    """The scene of image ``index``: its shapes left to right and its background."""
    rng = _rng(seed, index, 0)
    count = int(rng.integers(1, 4))
    slots = sorted(rng.choice(len(SLOTS), size=count, replace=False).tolist())
    colours = list(COLOURS)
    shapes = tuple(
        Shape(
            kind=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=colours[int(rng.integers(len(colours)))],
            size=SIZES[int(rng.integers(len(SIZES)))],
            slot=SLOTS[s],
        )
        for s in slots
    )
    return Scene(index=index, shapes=shapes, background=int(rng.integers(200, 246)))


# ------------------------------------------------------------------------ images
def _draw_shapes(draw: ImageDraw.ImageDraw, scene: Scene, rng: np.random.Generator, left: float, side: float) -> None:
    """The scene's shapes in the square of ``side`` pixels whose left edge is at ``left``."""
    slot_w = side / len(SLOTS)
    for shape in scene.shapes:
        # Radius as a fraction of a slot, so shapes never overlap and a scene reads
        # the same at any image size.
        r = slot_w * (0.28 if shape.size == "small" else 0.44)
        cx = left + slot_w * (SLOTS.index(shape.slot) + 0.5) + rng.uniform(-0.06, 0.06) * slot_w
        cy = side * rng.uniform(0.3, 0.7)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            h = r * 0.85  # a square of the same area reads as "bigger"; keep them close
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


def render(scene: Scene, size: int, seed: int) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels."""
    rng = _rng(seed, scene.index, 1)
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (scene.background,) * 3)
    _draw_shapes(ImageDraw.Draw(img), scene, rng, 0.0, big)
    img = img.resize((size, size), Image.Resampling.BOX)
    # Light texture: seeded per-pixel noise, so backgrounds are not one flat value.
    noise = rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def render_photo(scene: Scene, seed: int, width: int = PHOTO_SIZE[0], height: int = PHOTO_SIZE[1]) -> Image.Image:
    """The scene on a photo-like background: ``width`` x ``height`` RGB, for JPEG.

    Smooth colour fields and sensor-like noise make it decode and compress like a
    photo (what the real-size profile measures); the shapes sit in the centre
    square, which CLIP's centre crop keeps whole.
    """
    rng = _rng(seed, scene.index, 3)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    field = (np.sin(rng.uniform(2, 12) * x + rng.uniform(0, 6)) * 0.5 + 0.5) * \
            (np.cos(rng.uniform(2, 12) * y + rng.uniform(0, 6)) * 0.5 + 0.5)
    base = rng.uniform(80, 255, 3).astype(np.float32)
    img = scene.background * 0.5 + field * base * 0.5 + rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    side = min(width, height)
    _draw_shapes(ImageDraw.Draw(photo), scene, rng, (width - side) / 2, side)
    return photo


# ---------------------------------------------------------------------- captions
def _phrase(shape: Shape, rng: np.random.Generator, with_size: bool, colours: Optional[dict[str, str]]) -> str:
    noun = _pick(rng, _SHAPE_WORDS[shape.kind])
    colour = shape.colour if colours is None else colours[shape.colour]
    if with_size:
        return f"{_pick(rng, _SIZE_WORDS[shape.size])} {colour} {noun}"
    return f"{colour} {noun}"


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _one(scene: Scene, template: int, rng: np.random.Generator, colours: Optional[dict[str, str]]) -> str:
    s = scene.shapes[0]
    p = _phrase(s, rng, with_size=True, colours=colours)
    return [
        lambda: f"{_an(p)} {_POS_ON[s.slot]}",
        lambda: f"one {p} {_POS_AT[s.slot]}",
        lambda: f"there is {_an(p)} {_POS_OF[s.slot]}",
        lambda: f"{_an(p)} {_POS_ON[s.slot]} of the image",
        lambda: f"a single {p} {_POS_ON[s.slot]}",
        lambda: f"{_POS_ON[s.slot]} there is {_an(p)}",
    ][template % 6]()


def _many(scene: Scene, template: int, rng: np.random.Generator, colours: Optional[dict[str, str]]) -> str:
    n = len(scene.shapes)
    sized = template % 2 == 0
    parts = [_an(_phrase(s, rng, with_size=sized, colours=colours)) for s in scene.shapes]
    listed = " and ".join(parts) if n == 2 else f"{parts[0]}, {parts[1]} and {parts[2]}"
    word = _COUNT_WORDS[n]
    if n == 2:
        return [
            lambda: f"{parts[0]} and {parts[1]}",
            lambda: f"{parts[0]} to the left of {parts[1]}",
            lambda: f"two shapes: {parts[0]} on the left and {parts[1]} on the right",
            lambda: f"{parts[1]} to the right of {parts[0]}",
            lambda: f"there are two shapes, {listed}",
            lambda: f"from left to right {listed}",
        ][template % 6]()
    return [
        lambda: f"three shapes: {listed}",
        lambda: f"{listed} from left to right",
        lambda: f"a row of {word} shapes: {listed}",
        lambda: f"from left to right {listed}",
        lambda: f"there are three shapes, {listed}",
        lambda: f"{listed} in a row",
    ][template % 6]()


def captions_for(scene: Scene, count: int, seed: int, colours: Optional[dict[str, str]] = None) -> list[str]:
    """``count`` reference captions of a scene, same content in varied wording.

    ``colours`` names each colour with another word (``COLOUR_WORDS_B``); the draws,
    hence templates and synonyms, are the same as without it."""
    rng = _rng(seed, scene.index, 2)
    make = _one if len(scene.shapes) == 1 else _many
    order = rng.permutation(6).tolist()
    out: list[str] = []
    for i in range(count):
        caption = make(scene, order[i % 6], rng, colours)
        # More captions than templates: try other synonyms before accepting a repeat.
        for _ in range(5):
            if caption not in out:
                break
            caption = make(scene, order[i % 6], rng, colours)
        out.append(caption)
    return out


def tokens_of(caption: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", caption.lower())


# ------------------------------------------------------------------------ writing
def generate_demo(out_dir: Path, params: DemoData) -> None:
    """Write the demo dataset into ``out_dir``.

    ``images/<key>.png``, ``captions.json`` (COCO captions annotations) and
    ``dataset_demo.json`` (Karpathy split format, split chosen per image). The
    images folder is built under a temporary name and swapped in when complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_images = out_dir / ".images.tmp"
    if tmp_images.exists():
        shutil.rmtree(tmp_images)  # leftover of an interrupted run: ours, never whole
    tmp_images.mkdir()

    coco_images, annotations, karpathy = [], [], []
    sent_id = 0
    for index in tqdm(range(params.images), desc="demo scenes", unit="img"):
        scene = scene_for(index, params.seed)
        if params.style == "photo":
            file_name, (width, height) = f"{scene.key}.jpg", PHOTO_SIZE
            render_photo(scene, params.seed).save(tmp_images / file_name, "JPEG", quality=PHOTO_QUALITY)
        else:
            file_name, width, height = f"{scene.key}.png", params.image_size, params.image_size
            render(scene, params.image_size, params.seed).save(tmp_images / file_name, optimize=False)
        captions = captions_for(scene, params.captions_per_image, params.seed)
        coco_images.append({"id": index, "file_name": file_name, "width": width, "height": height})
        sent_ids = list(range(sent_id, sent_id + len(captions)))
        for sid, caption in zip(sent_ids, captions):
            annotations.append({"id": sid, "image_id": index, "caption": caption})
        karpathy.append(
            {
                "imgid": index,
                "cocoid": index,
                "filename": file_name,
                "split": split_for(scene.key, VAL_FRACTION, TEST_FRACTION),
                "sentences": [
                    {"raw": c, "tokens": tokens_of(c), "imgid": index, "sentid": sid}
                    for sid, c in zip(sent_ids, captions)
                ],
                "sentids": sent_ids,
            }
        )
        sent_id += len(captions)

    images_dir = out_dir / "images"
    old = out_dir / ".images.old"
    if images_dir.exists():
        os.replace(images_dir, old)
    os.replace(tmp_images, images_dir)
    if old.exists():
        shutil.rmtree(old)
    info = {"description": "capline demo scenes", "seed": params.seed, "image_size": params.image_size}
    if params.style == "photo":
        info = {"description": "capline demo scenes on photo-like backgrounds", "seed": params.seed,
                "width": PHOTO_SIZE[0], "height": PHOTO_SIZE[1]}
    write_json(out_dir / "captions.json", {"info": info, "images": coco_images, "annotations": annotations},
               separators=(",", ":"))
    write_json(out_dir / "dataset_demo.json", {"dataset": "demo", "images": karpathy}, separators=(",", ":"))
