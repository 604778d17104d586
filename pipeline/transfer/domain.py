"""Domain B of the transfer experiment: new demo scenes, captioned in B's wording.

The scenes come from the demo's generator with a seed of their own (other images
than the dataset's, drawn the same way), so the images show nothing new; the
captions name the colours with words the dataset's captions never use
(``COLOUR_WORDS_B``). Splits are chosen per image as the dataset's are.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

from pipeline.core.params import Params
from pipeline.formats.records import split_for
from pipeline.prepare.scenes import (COLOUR_WORDS_B, TEST_FRACTION, VAL_FRACTION, Scene, captions_for, render,
                                     render_photo, scene_for)

# Domain B's scene stream is (seed offset + transfer.seed): never one of the dataset's seeds in practice.
SEED_OFFSET = 3_000_017
WORDINGS = {"colours": COLOUR_WORDS_B}


@dataclass(frozen=True)
class DomainImage:
    key: str
    split: str
    scene: Scene
    captions: tuple[str, ...]


def domain_images(params: Params) -> list[DomainImage]:
    """Every image of domain B (``transfer.images``), with its split and reference captions."""
    t, demo = params.transfer, params.data.demo
    seed = SEED_OFFSET + t.seed
    out = []
    for index in range(t.images):
        scene = scene_for(index, seed)
        key = f"b_{scene.key}"
        out.append(DomainImage(key=key, split=split_for(key, VAL_FRACTION, TEST_FRACTION), scene=scene,
                               captions=tuple(captions_for(scene, demo.captions_per_image, seed, WORDINGS[t.domain]))))
    return out


def image_bytes(image: DomainImage, params: Params) -> bytes:
    """The image as its file would hold it in the dataset: PNG of the demo's size, or the photo style's JPEG."""
    demo, seed = params.data.demo, SEED_OFFSET + params.transfer.seed
    buf = io.BytesIO()
    if demo.style == "photo":
        from pipeline.prepare.scenes import PHOTO_QUALITY

        render_photo(image.scene, seed).save(buf, "JPEG", quality=PHOTO_QUALITY)
    else:
        render(image.scene, demo.image_size, seed).save(buf, "PNG")
    return buf.getvalue()


def coco_captions(images: list[DomainImage]) -> dict:
    """A COCO captions file of ``images`` (image ids are the keys): a datastore's source."""
    return {
        "images": [{"id": im.key} for im in images],
        "annotations": [{"id": n, "image_id": im.key, "caption": c}
                        for n, (im, c) in enumerate((im, c) for im in images for c in im.captions)],
    }


def in_split(images: list[DomainImage], split: str) -> Iterator[DomainImage]:
    return (im for im in images if im.split == split)
