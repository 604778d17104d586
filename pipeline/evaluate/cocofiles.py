"""Reading COCO captions (references) and COCO results (candidates) files.

Both are untrusted input: every problem is reported with the file and the record,
never as a bare assertion deep inside pycocoevalcap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

from pipeline.core.errors import CaplineError

ImageId = Hashable  # int or str, exactly as the references file spells it


class EvaluationInputError(CaplineError):
    """A results or references file that cannot be scored; the message names file and record."""


@dataclass(frozen=True)
class References:
    """Reference captions per image, in the order of the file's `images` list."""

    ids: list[ImageId]
    captions: dict[ImageId, list[str]]

    def resolve(self, image_id: Any) -> ImageId | None:
        """Map an id from another file (int or str) onto this file's id, or None."""
        if image_id in self.captions:
            return image_id
        return self._by_str().get(str(image_id))

    def _by_str(self) -> dict[str, ImageId]:
        cache = self.__dict__.get("_str_index")
        if cache is None:
            cache = {str(i): i for i in self.ids}
            object.__setattr__(self, "_str_index", cache)
        return cache


def _read_json(path: Path, what: str) -> Any:
    if not path.exists():
        raise EvaluationInputError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluationInputError(f"{what} file {path}: not valid UTF-8 JSON ({err})") from None


def _check_id(value: Any, where: str) -> ImageId:
    # bool is an int subclass but never a sensible id; floats do not round-trip as keys.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EvaluationInputError(f"{where}: image_id must be an int or a string (got {value!r})")
    return value


def load_references(path: str | Path) -> References:
    """Read a COCO captions file: `{"images": [{"id"}], "annotations": [{"image_id", "caption"}]}`."""
    path = Path(path)
    data = _read_json(path, "references")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise EvaluationInputError(
            f"references file {path}: expected a COCO captions object with an 'annotations' list"
        )
    ids: list[ImageId] = []
    captions: dict[ImageId, list[str]] = {}
    for n, img in enumerate(data.get("images") or []):
        if not isinstance(img, dict) or "id" not in img:
            raise EvaluationInputError(f"references file {path}: images[{n}] has no 'id'")
        image_id = _check_id(img["id"], f"references file {path}: images[{n}]")
        if image_id not in captions:
            ids.append(image_id)
            captions[image_id] = []
    for n, ann in enumerate(data["annotations"]):
        where = f"references file {path}: annotations[{n}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise EvaluationInputError(f"{where}: needs 'image_id' and 'caption'")
        image_id = _check_id(ann["image_id"], where)
        if not isinstance(ann["caption"], str):
            raise EvaluationInputError(f"{where} (image {image_id!r}): caption must be a string")
        if image_id not in captions:
            ids.append(image_id)
            captions[image_id] = []
        captions[image_id].append(ann["caption"])
    if not any(captions.values()):
        raise EvaluationInputError(f"references file {path}: no reference captions")
    return References(ids=ids, captions=captions)


def load_results(path: str | Path, references: References) -> dict[ImageId, str]:
    """Read a COCO results file `[{"image_id", "caption"}]`, keyed by the references' ids.

    The order is that of the references (what pycocotools' loadRes gives), so corpus
    scores are summed in the same order as COCOEvalCap's.
    """
    path = Path(path)
    data = _read_json(path, "results")
    if not isinstance(data, list):
        raise EvaluationInputError(f"results file {path}: expected a list of {{'image_id', 'caption'}}")
    found: dict[ImageId, str] = {}
    for n, item in enumerate(data):
        where = f"results file {path}: item {n}"
        if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
            raise EvaluationInputError(f"{where}: needs 'image_id' and 'caption'")
        raw_id = _check_id(item["image_id"], where)
        if not isinstance(item["caption"], str):
            raise EvaluationInputError(f"{where} (image {raw_id!r}): caption must be a string")
        image_id = references.resolve(raw_id)
        if image_id is None:
            raise EvaluationInputError(f"{where}: image_id {raw_id!r} is not in the references")
        if not references.captions[image_id]:
            raise EvaluationInputError(f"{where}: image_id {raw_id!r} has no reference captions")
        if image_id in found:
            raise EvaluationInputError(
                f"{where}: image_id {raw_id!r} appears twice; score one caption per image"
            )
        found[image_id] = item["caption"]
    if not found:
        raise EvaluationInputError(f"results file {path}: no captions to score")
    return {i: found[i] for i in references.ids if i in found}
