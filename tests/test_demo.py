"""The demo scene generator: deterministic files, COCO + Karpathy formats that agree."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.prepare.scenes import COLOURS, SHAPES, captions_for, generate_demo, render, scene_for, tokens_of
from pipeline.core.params import DemoData


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, DemoData(images=120, image_size=32, captions_per_image=6, seed=3))
    return out


def test_same_params_give_byte_identical_files(demo, tmp_path):
    generate_demo(tmp_path, DemoData(images=120, image_size=32, captions_per_image=6, seed=3))
    assert _digest(tmp_path) == _digest(demo)
    generate_demo(tmp_path / "other", DemoData(images=120, image_size=32, captions_per_image=6, seed=4))
    assert _digest(tmp_path / "other")["captions.json"] != _digest(demo)["captions.json"]


def test_image_i_does_not_depend_on_dataset_size(demo, tmp_path):
    generate_demo(tmp_path, DemoData(images=10, image_size=32, captions_per_image=6, seed=3))
    for i in (0, 9):
        name = f"images/scene_{i:05d}.png"
        assert (tmp_path / name).read_bytes() == (demo / name).read_bytes()


def test_coco_file_lists_every_image_with_its_captions(demo):
    coco = json.loads((demo / "captions.json").read_text())
    assert [im["id"] for im in coco["images"]] == list(range(120))
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert set(per_image.values()) == {6}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for im in coco["images"][:20]:
        with Image.open(demo / "images" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"]) == (32, 32) and img.mode == "RGB"
    assert not list(demo.glob(".*")), "temporary files left behind"


def test_karpathy_file_matches_coco_and_splits_per_image(demo):
    coco = json.loads((demo / "captions.json").read_text())
    kp = json.loads((demo / "dataset_demo.json").read_text())
    assert kp["dataset"] == "demo"
    by_id = {}
    for a in coco["annotations"]:
        by_id.setdefault(a["image_id"], []).append((a["id"], a["caption"]))
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    splits = Counter()
    for im in kp["images"]:
        assert im["imgid"] == im["cocoid"] and im["filename"] == names[im["cocoid"]]
        assert [(s["sentid"], s["raw"]) for s in im["sentences"]] == by_id[im["cocoid"]]
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert all(s["tokens"] == tokens_of(s["raw"]) and s["tokens"] for s in im["sentences"])
        splits[im["split"]] += 1
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"] > splits["test"] > splits["val"]


def test_captions_vary_in_wording_but_name_the_scene():
    for index in range(60):
        scene = scene_for(index, seed=0)
        caps = captions_for(scene, 5, seed=0)
        assert len(caps) == 5 and len(set(caps)) >= 4
        for cap in caps:
            for shape in scene.shapes:
                assert shape.colour in cap.split()
            # Objects are named left to right.
            positions = [cap.split().index(s.colour) for s in scene.shapes if cap.split().count(s.colour) == 1]
            if len(positions) == len(scene.shapes) and "right of" not in cap:
                assert positions == sorted(positions), cap


def test_many_captions_per_image_stay_distinct():
    caps = captions_for(scene_for(5, seed=0), 12, seed=0)
    assert len(caps) == 12 and len(set(caps)) >= 10


def test_attributes_are_roughly_balanced():
    scenes = [scene_for(i, seed=0) for i in range(600)]
    counts = Counter(len(s.shapes) for s in scenes)
    colours = Counter(sh.colour for s in scenes for sh in s.shapes)
    kinds = Counter(sh.kind for s in scenes for sh in s.shapes)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 150
    assert set(colours) == set(COLOURS) and min(colours.values()) > 0.6 * max(colours.values())
    assert set(kinds) == set(SHAPES) and min(kinds.values()) > 0.7 * max(kinds.values())
    # No caption fits many images: the most common first caption covers few of them.
    firsts = Counter(captions_for(s, 1, seed=0)[0] for s in scenes)
    assert firsts.most_common(1)[0][1] < 15


def test_render_draws_the_named_colour_where_the_shape_is():
    scene = next(s for s in (scene_for(i, 0) for i in range(50)) if len(s.shapes) == 1 and s.shapes[0].size == "large")
    arr = np.asarray(render(scene, 64, seed=0)).astype(int)
    third = {"left": arr[:, :21], "middle": arr[:, 21:43], "right": arr[:, 43:]}[scene.shapes[0].slot]
    target = np.array(COLOURS[scene.shapes[0].colour])
    assert (np.abs(third - target).sum(-1) < 40).sum() > 50


def test_rerun_replaces_images_and_keeps_no_temporaries(tmp_path):
    generate_demo(tmp_path, DemoData(images=12, image_size=16, seed=0))
    (tmp_path / "images" / "scene_99999.png").write_bytes(b"stale")
    generate_demo(tmp_path, DemoData(images=10, image_size=16, seed=0))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"scene_{i:05d}.png" for i in range(10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.json", "dataset_demo.json", "images"]
