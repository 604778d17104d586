"""Fixture files for the evaluate tests: COCO pairs, image tar shards, feature shards."""
from __future__ import annotations

import io
import json
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

SCRIPT_CAPTION = "<script>alert('x')</script> a red square & a \"circle\""

# Image key -> reference captions: unicode, HTML, several sentences, quotes.
REFERENCES = {
    "img-a": ["A red square on the left.", "a red box, at the left side",
              "The square is red. It sits on the left!", "a small red square"],
    "img-b": ["Two blue circles. They are small!", "two small blue circles",
              "a pair of blue dots", "Two circles, both blue."],
    "img-c": ["A café sign — naïve <b>bold</b> text", "a green triangle near a café",
              "日本語 text beside a triangle", "the triangle is green &amp; big"],
    "img-d": ["a yellow star at the top", "A star, yellow, at the top.",
              "one yellow star above", "\"a star\" she said: yellow"],
    "img_e": ["three black lines", "Three lines. They are black.", "black lines, three of them",
              "three thin black lines 🙂"],
    "img-f": ["a purple square and a red circle", "A red circle next to a purple square.",
              "purple square, red circle", "a square (purple) and a circle (red)"],
}
RESULTS = {
    "img-a": "a red square on the left",
    "img-b": "two blue circles",
    "img-c": "a <b>green</b> triangle near a café…",
    "img-d": SCRIPT_CAPTION,
    "img_e": "three black lines. They are thin!",
    "img-f": "a purple square and a red circle",
}
# The same model fed shuffled features: captions of other images.
CONTROL = {k: RESULTS[o] for k, o in zip(RESULTS, list(RESULTS)[2:] + list(RESULTS)[:2])}
TRAIN_CAPTIONS = [
    "a red square", "a red square", "A red square.", "two blue circles", "two blue circles",
    "a green triangle", "a yellow star", "three black lines", "a purple square and a red circle",
    "a square", "a square", "a square", "a square",
]


def write_coco_pair(folder: Path, int_ids: bool = False) -> tuple[Path, Path, Path]:
    """references.json, results.json and results_shuffled.json; ids are str keys or ints."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(REFERENCES)
    ident = (lambda k: keys.index(k) + 1) if int_ids else (lambda k: k)
    refs = {"images": [{"id": ident(k)} for k in keys], "annotations": []}
    for k, caps in REFERENCES.items():
        for c in caps:
            refs["annotations"].append({"image_id": ident(k), "id": len(refs["annotations"]) + 1, "caption": c})
    paths = folder / "references.json", folder / "results.json", folder / "results_shuffled.json"
    paths[0].write_text(json.dumps(refs, ensure_ascii=False), encoding="utf-8")
    paths[1].write_text(json.dumps([{"image_id": ident(k), "caption": c} for k, c in RESULTS.items()]), encoding="utf-8")
    paths[2].write_text(json.dumps([{"image_id": ident(k), "caption": c} for k, c in CONTROL.items()]), encoding="utf-8")
    return paths


def write_image_shard(path: Path, keys: list[str], size: int = 48) -> None:
    """A webdataset tar: KEY.jpg + KEY.json per image (what the download stage writes)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for n, key in enumerate(sorted(keys)):
            buf = io.BytesIO()
            Image.new("RGB", (size, size), (40 * n % 256, 90, 200)).save(buf, format="JPEG")
            meta = json.dumps({"key": key, "url": f"file:///{key}.jpg", "split": "test",
                               "captions": REFERENCES.get(key, []), "width": size, "height": size}).encode()
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_features(folder: Path, train_captions: list[str] = TRAIN_CAPTIONS) -> None:
    """One feature shard: the training captions (one per image) plus the test images."""
    from pipeline.formats.features import FeatureTable, write_feature_shard

    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"train-{n}" for n in range(len(train_captions))] + list(REFERENCES)
    splits = ["train"] * len(train_captions) + ["test"] * len(REFERENCES)
    captions = [[c] for c in train_captions] + [REFERENCES[k] for k in REFERENCES]
    table = FeatureTable(keys=keys, embeddings=np.zeros((len(keys), 4), np.float32), splits=splits,
                         captions=captions, attrs={"model_id": "test", "format_version": 1})
    write_feature_shard(folder / "00000.h5", table)


class ReportParser(HTMLParser):
    """Collects script elements and the text of each table cell of the report."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[str] = []
        self.cells: list[str] = []
        self.images: list[str] = []
        self._in_script = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        elif tag in ("td", "div", "li"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        elif tag in ("td", "div", "li") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        elif self._cell is not None:
            self._cell.append(data)
