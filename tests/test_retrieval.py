"""Retrieval augmentation (SmallCap): the datastore and retrieve stages on a tiny whole CLIP.

The image vectors of the tests are the CLIP text embeddings of one of each image's
own captions, so without the exclusion an image's own caption is its nearest one:
the leakage test sees it (and checks that it would).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.features import COLOURS, SHAPES
from tests.helpers.models import torch_threads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Image i has captions "a COLOUR SHAPE" and "one COLOUR SHAPE here" of its class.
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]


def _params(**retrieval):
    from pipeline.core.params import parse_params

    # k 4, SmallCap's (params.yaml keeps 0, the plain captioner, until retrieval is measured)
    return parse_params({"device": "cpu", "retrieval": {"batch_size": 4, "k": 4, **retrieval}})


def _encode(clip: Path, texts: list[str]) -> np.ndarray:
    import torch

    from pipeline.retrieval.text_encoder import TextEncoder

    return TextEncoder.load(clip, torch.device("cpu"))(texts)


def _features(folder: Path, clip: Path, keys: list[str], captions: list[list[str]], splits: list[str],
              shards: int = 2, attrs: dict | None = None, same: tuple[str, str] | None = None) -> Path:
    """Feature shards whose vectors are the text embeddings of each image's first caption, each
    moved a little (so no two images are the same picture; ``same``: these two are)."""
    from pipeline.formats.features import FeatureTable
    from tests.helpers.features import write_features
    from tests.helpers.models import clip_feature_attrs

    vectors = _encode(clip, [c[0] for c in captions])
    vectors = vectors + 1e-2 * np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if same:  # the same picture again: equal but for the last bits (another batch)
        vectors[keys.index(same[1])] = vectors[keys.index(same[0])] * np.float32(1 + 1e-7)
    made = clip_feature_attrs(clip, vectors.shape[1])
    made.pop("dim")
    table = FeatureTable(keys=keys, embeddings=vectors, splits=splits, captions=captions,
                         attrs={**made, **(attrs or {})})
    return write_features(folder, table, shards)


def _scene_images(n_per_class: int = 2):
    keys, captions, splits = [], [], []
    for i, (c, s) in enumerate(CLASSES):
        for j in range(n_per_class):
            keys.append(f"img_{i:02d}_{j}")
            captions.append([f"a {c} {s}", f"one {c} {s} here"])
            splits.append("train" if j % 2 == 0 else "test")
    return keys, captions, splits


@pytest.fixture(scope="module")
def world(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    """Feature shards of the scene images; their training captions' datastore; retrieval of every image."""
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.retrieval.retrieve import retrieve_shards

    tmp = tmp_path_factory.mktemp("retrieval")
    keys, captions, splits = _scene_images()
    features = _features(tmp / "features", hub_clip_dir, keys, captions, splits)
    params = _params()
    store = build_datastore(params, features, hub_clip_dir, tiny_gpt_dir, tmp / "datastore", Rank(), progress=False)
    done = retrieve_shards(params.retrieval, features, tmp / "datastore", tmp / "retrieval", Rank(), progress=False)
    return {"tmp": tmp, "features": features, "clip": hub_clip_dir, "gpt": tiny_gpt_dir, "params": params,
            "store": store, "retrieved": done, "keys": keys, "captions": captions, "splits": splits}


def _neighbours(folder: Path) -> dict[str, dict]:
    from pipeline.formats.neighbours import read_neighbour_shard

    out = {}
    for path in sorted(folder.glob("*.h5")):
        t = read_neighbour_shard(path)
        for i, key in enumerate(t.keys):
            out[key] = {"ids": t.ids[i].tolist(), "scores": t.scores[i].tolist(), "captions": t.captions[i],
                        "split": t.splits[i]}
    return out


def _store_keys(folder: Path) -> list:
    return [json.loads(line)["key"] for line in (folder / "captions.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the datastore
def test_datastore_holds_the_training_captions_with_their_keys(world):
    from pipeline.retrieval.store import Datastore

    store = Datastore.load(world["tmp"] / "datastore")
    train = [(k, c) for k, caps, s in zip(world["keys"], world["captions"], world["splits"]) if s == "train"
             for c in caps]
    assert list(zip(store.keys, store.texts)) == train
    assert store.manifest["index"]["type"] == "IndexFlatIP" and store.manifest["dim"] == 16
    assert world["store"]["captions"] == len(train) and world["store"]["dropped_empty"] == 0
    # The index holds the captions' text embeddings, unit length, row i = caption i.
    vectors = store.index.reconstruct_n(0, store.index.ntotal)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[:3], _encode(world["clip"], store.texts[:3]), atol=1e-5)


def test_every_image_gets_k_neighbours_nearest_first(world):
    found = _neighbours(world["tmp"] / "retrieval")
    assert sorted(found) == sorted(world["keys"])
    for row in found.values():
        assert len(row["captions"]) == 4 and len(set(row["ids"])) == 4
        assert row["scores"] == sorted(row["scores"], reverse=True)
    # A test image's captions are not in the datastore: its nearest is its own wording from a training image.
    test_key = next(k for k, s in zip(world["keys"], world["splits"]) if s == "test")
    own = world["captions"][world["keys"].index(test_key)]
    assert found[test_key]["captions"][0] == own[0] and found[test_key]["scores"][0] == pytest.approx(1.0, abs=1e-2)


# ------------------------------------------------------------------ leakage
def test_an_image_never_retrieves_its_own_captions_even_planted_twice(world, tmp_path):
    """The datastore holds image X's caption twice under X's key (a planted duplicate) and once
    under another image's key Y. X's neighbours hold no caption of X's key; Y's copy of the same
    words is a fair neighbour (ownership is by key, not by text)."""
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.retrieval.retrieve import Owners, nearest_others, retrieve_shards, unit_rows
    from pipeline.retrieval.store import Datastore

    keys, captions, splits = ["x", "y", "z"], [["a red circle"], ["a blue square"], ["a green triangle"]], \
        ["train", "train", "train"]
    features = _features(tmp_path / "features", world["clip"], keys, captions, splits, shards=1)
    rows = [{"key": "x", "caption": "a red circle"}, {"key": "x", "caption": "a red circle"},
            {"key": "y", "caption": "a red circle"}, {"key": "y", "caption": "a blue square"},
            {"key": "z", "caption": "a green triangle"}, {"caption": "one yellow circle here"},
            {"key": "z", "caption": "one green triangle here"}]
    source = tmp_path / "captions.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = _params(source=str(source), k=2, retrieve_candidates=2)
    build_datastore(params, features, world["clip"], world["gpt"], tmp_path / "store", Rank(), progress=False)
    done = retrieve_shards(params.retrieval, features, tmp_path / "store", tmp_path / "out", Rank(), progress=False)

    owner = _store_keys(tmp_path / "store")
    x = _neighbours(tmp_path / "out")["x"]
    assert all(owner[i] != "x" for i in x["ids"]), x
    assert x["captions"][0] == "a red circle" and owner[x["ids"][0]] == "y"
    # Both copies of x's caption were among its candidates and excluded; it was searched again for room.
    assert done["excluded_own"] >= 2 and done["searched_again"] >= 1
    # Y's copy of x's words is counted: the sign of a duplicate image under another key.
    assert done["images_with_own_text_neighbour"] >= 1

    # The test can fail: without the exclusion, x's own captions are its nearest.
    store = Datastore.load(tmp_path / "store")
    query = unit_rows(_encode(world["clip"], ["a red circle"]))
    ids, _, _ = nearest_others(store.index, query, ["x"], Owners.of([None] * len(store)), 2, 2)
    assert any(owner[i] == "x" for i in ids[0])


def test_the_same_image_under_another_key_is_excluded_too(world, tmp_path):
    """x2 is x's picture again (its vector equal but for the last bits) under another key: x2's captions are x's
    own, so neither image gets the other's; a merely similar image's captions stay."""
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.retrieval.duplicates import duplicate_images
    from pipeline.retrieval.retrieve import Owners, nearest_others, retrieve_shards, unit_rows
    from pipeline.retrieval.store import Datastore

    keys = ["x", "w", "x2", "y", "z"]
    captions = [["a red circle"], ["a red circle here"], ["one red circle here"], ["a blue square"],
                ["a green triangle"]]
    features = _features(tmp_path / "features", world["clip"], keys, captions, ["train"] * 5, same=("x", "x2"))
    params = _params(k=2, retrieve_candidates=3)
    build_datastore(params, features, world["clip"], world["gpt"], tmp_path / "store", Rank(), progress=False)
    done = retrieve_shards(params.retrieval, features, tmp_path / "store", tmp_path / "out", Rank(), progress=False)
    assert done["duplicate_images"] == 1
    owner = _store_keys(tmp_path / "store")
    found = _neighbours(tmp_path / "out")
    for key in ("x", "x2"):
        assert {owner[i] for i in found[key]["ids"]}.isdisjoint({"x", "x2"}), (key, found[key])
    assert owner[found["w"]["ids"][0]] in ("x", "x2")  # a similar picture is a fair neighbour

    # The test can fail: with keys alone, x2's caption is among x's neighbours.
    store = Datastore.load(tmp_path / "store")
    assert duplicate_images(sorted(features.glob("*.h5"))) == {"x2": "x"}
    from pipeline.formats.features import load_features

    table = load_features(features)
    ids, _, _ = nearest_others(store.index, unit_rows(table.embeddings[:1]), ["x"], Owners.of(store.keys), 2, 3)
    assert "x2" in {owner[i] for i in ids[0]}


def test_duplicates_are_found_across_shards_and_only_they(tmp_path):
    from pipeline.formats.features import FeatureTable
    from pipeline.retrieval.duplicates import duplicate_images
    from tests.helpers.features import FEATURE_ATTRS, write_features

    rng = np.random.default_rng(0)
    base = rng.normal(size=(2000, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[:50] * (1 + 1e-6 * rng.normal(size=(50, 1))).astype(np.float32)  # last-bit differences
    near = base[50:100] + 0.02 * rng.normal(size=(50, 64)).astype(np.float32)  # cos ~0.99: another picture
    vectors = np.concatenate([base, copies, near]).astype(np.float32)
    keys = [f"k{i:04d}" for i in range(len(vectors))]
    table = FeatureTable(keys=keys, embeddings=vectors, splits=["train"] * len(keys),
                         captions=[["c"]] * len(keys), attrs=dict(FEATURE_ATTRS))
    write_features(tmp_path / "f", table, shards=3)
    found = duplicate_images(sorted((tmp_path / "f").glob("*.h5")))
    assert found == {f"k{2000 + i:04d}": f"k{i:04d}" for i in range(50)}


def test_exclusion_holds_when_own_captions_fill_every_candidate(world):
    """Training images' vectors are their own first caption's embedding, and the 15 candidates hold
    every copy of it; still no neighbour of a training image comes from its key."""
    found = _neighbours(world["tmp"] / "retrieval")
    owner = _store_keys(world["tmp"] / "datastore")
    for key, row in found.items():
        assert all(owner[i] != key for i in row["ids"]), (key, row)
    assert world["retrieved"]["excluded_own"] >= sum(s == "train" for s in world["splits"])


# ------------------------------------------------------------------ bad input
def test_a_datastore_of_another_clip_is_refused_naming_both(world, tmp_path):
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.retrieve import retrieve_shards
    from pipeline.retrieval.store import DatastoreError

    keys, captions, splits = _scene_images(1)
    other = _features(tmp_path / "other", world["clip"], keys, captions, splits, shards=1,
                      attrs={"model_id": "openai/clip-vit-base-patch32", "model_revision": "c" * 40})
    with pytest.raises(DatastoreError) as err:
        retrieve_shards(world["params"].retrieval, other, world["tmp"] / "datastore", tmp_path / "out", Rank(),
                        progress=False)
    message = str(err.value)
    manifest = json.loads((world["tmp"] / "datastore" / "manifest.json").read_text())
    assert "openai/clip-vit-base-patch32" in message and "c" * 40 in message
    assert manifest["model_id"] in message and manifest["model_revision"] in message
    assert not (tmp_path / "out").exists()

    # The same model id and revision with another width is refused too, naming both widths.
    from pipeline.formats.features import FeatureTable, read_attrs
    from tests.helpers.features import write_features

    attrs = read_attrs(next(world["features"].glob("*.h5")))
    narrow = FeatureTable(keys=["a"], embeddings=np.ones((1, 8), np.float32), splits=["train"],
                          captions=[["a red circle"]], attrs=attrs)
    write_features(tmp_path / "narrow", narrow, 1)
    with pytest.raises(DatastoreError, match=r"width 16.*width 8"):
        retrieve_shards(world["params"].retrieval, tmp_path / "narrow", world["tmp"] / "datastore",
                        tmp_path / "out2", Rank(), progress=False)


def test_fewer_captions_than_k_is_a_clear_error(world, tmp_path):
    from pipeline.core.errors import CaplineError
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.retrieval.retrieve import retrieve_shards

    source = tmp_path / "three.txt"
    source.write_text("a red circle\na blue square\na green triangle\n")
    with pytest.raises(CaplineError, match=r"3 captions left .*retrieval.k needs at least 4"):
        build_datastore(_params(source=str(source)), world["features"], world["clip"], world["gpt"],
                        tmp_path / "store", Rank(), progress=False)
    build_datastore(_params(source=str(source), k=2), world["features"], world["clip"], world["gpt"],
                    tmp_path / "store", Rank(), progress=False)
    with pytest.raises(CaplineError, match=r"holds 3 captions, fewer than retrieval.k=4"):
        retrieve_shards(_params().retrieval, world["features"], tmp_path / "store", tmp_path / "out", Rank(),
                        progress=False)


def test_a_clip_without_text_tower_is_refused_before_work(world, tiny_clip_dir, tmp_path):
    from pipeline.core.errors import CaplineError
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore

    with pytest.raises(CaplineError, match=r"text tower, and .*clip has none usable"):
        build_datastore(_params(), world["features"], tiny_clip_dir, world["gpt"], tmp_path / "store", Rank(),
                        progress=False)
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()


def test_empty_and_long_captions_are_dropped_and_counted(world, tmp_path):
    from pipeline.core.runtime import Rank
    from pipeline.retrieval.run import run_datastore

    lines = ["a red circle", "", "   ", "one blue square here", "a red circle " + "and a blue square " * 3,
             "a green triangle", "a yellow circle"]
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(lines) + "\n")
    metrics = tmp_path / "datastore.json"
    run_datastore(_params(source=str(source), max_caption_tokens=6), world["features"], world["clip"],
                  world["gpt"], tmp_path / "store", metrics, Rank())
    written = json.loads(metrics.read_text())
    assert (written["captions_read"], written["dropped_empty"], written["dropped_too_long"], written["captions"]) \
        == (7, 2, 1, 4)
    texts = [json.loads(line)["text"] for line in (tmp_path / "store" / "captions.jsonl").read_text().splitlines()]
    assert texts == ["a red circle", "one blue square here", "a green triangle", "a yellow circle"]


# ------------------------------------------------------------------ files
def test_every_caption_file_format_is_read(tmp_path):
    from pipeline.retrieval.captions import Caption, CaptionFileError, read_caption_file

    def read(name: str, text: str) -> list[tuple]:
        path = tmp_path / name
        path.write_text(text)
        return [(c.key, c.text) for c in read_caption_file(path)]

    coco = {"images": [{"id": 9}], "annotations": [{"image_id": 9, "id": 1, "caption": " A  red circle. "},
                                                   {"image_id": "x-1", "id": 2, "caption": "two"}]}
    # COCO ids become the prepare stage's keys (zero-padded), so exclusion by key finds them.
    assert read("c.json", json.dumps(coco)) == [("000000000009", "A red circle."), ("x-1", "two")]
    assert read("cc3m.tsv", "a dog\thttp://x/1.jpg\nhttp://x/2.jpg\ta cat\n") == [(None, "a dog"), (None, "a cat")]
    assert read("h.tsv", "key\tcaption\tbad\"quote\nk1\ta \"dog\"\tz\n".replace("bad\"quote", "url")) == \
        [("k1", 'a "dog"')]
    assert read("h.csv", 'caption,key\n"a, b",k2\n') == [("k2", "a, b")]
    assert read("plain.csv", "just a caption\n") == [(None, "just a caption")]
    assert read("l.jsonl", '{"key": "k3", "captions": ["a", "b"]}\n\n{"text": "c"}\n') == \
        [("k3", "a"), ("k3", "b"), (None, "c")]
    assert read("t.txt", "one\n\ntwo\n") == [(None, "one"), (None, ""), (None, "two")]
    with pytest.raises(CaptionFileError, match="unknown caption file type"):
        read("x.parquet", "")
    with pytest.raises(CaptionFileError, match=r"line 1: key 'a b'"):
        read("bad.jsonl", '{"key": "a b", "caption": "c"}\n')
    assert Caption("k", "t").key == "k"


def test_prompt_is_smallcaps():
    from pipeline.retrieval.prompt import prompt

    assert prompt(["a dog runs", "a cat sits"]) == \
        "Similar images show\n\na dog runs\n\na cat sits.\n\nThis image shows "


# ------------------------------------------------------------------ index
def _clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact_and_ivf_agrees_on_clustered_data():
    from pipeline.core.params import RetrievalParams
    from pipeline.retrieval.index import build_index, for_search, search

    data = _clustered(4000, 32, 20)
    queries = _clustered(200, 32, 20, seed=1)
    k = 10
    exact = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :k]
    flat, info = build_index(data, "flat", RetrievalParams())
    assert info["type"] == "IndexFlatIP"
    _, ids = search(for_search(flat, 1), queries, k)
    assert (np.sort(ids, axis=1) == np.sort(exact, axis=1)).mean() > 0.999  # ties aside, the same sets

    ivf, info = build_index(data, "ivf", RetrievalParams(ivf_nlist=32, ivf_nprobe=8))
    assert info == {"type": "IndexIVFFlat", "nlist": 32, "trained_on": 2048}
    _, ivf_ids = search(for_search(ivf, 8), queries, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ivf_ids, exact)])
    assert recall > 0.95
    _, few = search(for_search(ivf, 1), queries, k)
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(few, exact)]) < recall  # nprobe is used

    pq, info = build_index(data, "ivf", RetrievalParams(ivf_nlist=16, ivf_pq_m=8))
    assert info["type"] == "IndexIVFPQ"


def test_auto_index_is_flat_up_to_the_threshold():
    from pipeline.core.params import RetrievalParams
    from pipeline.retrieval.index import choose_kind

    p = RetrievalParams(flat_max_captions=100)
    assert (choose_kind(100, p), choose_kind(101, p)) == ("flat", "ivf")
    assert choose_kind(10**9, RetrievalParams(index="flat")) == "flat"


# ------------------------------------------------------------------ resume and ranks
def test_datastore_is_kept_when_current_and_resumes_after_a_kill(world, tmp_path, monkeypatch):
    from pipeline.core.runtime import Rank
    from pipeline.retrieval import chunks as chunks_module
    from pipeline.retrieval.datastore import build_datastore

    source = tmp_path / "many.txt"
    source.write_text("".join(f"a {c} {s}\none {c} {s} here\n" for c, s in CLASSES) * 3)  # 72 captions
    params = _params(source=str(source), batch_size=2)  # chunks of 32 captions: 3 chunks
    out = tmp_path / "store"
    saved = []
    real_save = chunks_module.EncodedChunks.save

    def save_then_die(self, i, vectors):
        real_save(self, i, vectors)
        saved.append(i)
        if len(saved) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(chunks_module.EncodedChunks, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(params, world["features"], world["clip"], world["gpt"], out, Rank(), progress=False)
    assert not out.exists() and len(list((tmp_path / "store.partial").glob("*.npy"))) == 2
    monkeypatch.setattr(chunks_module.EncodedChunks, "save", real_save)
    resumed = build_datastore(params, world["features"], world["clip"], world["gpt"], out, Rank(), progress=False)
    assert (resumed["chunks"], resumed["chunks_encoded"]) == (3, 1)
    assert not (tmp_path / "store.partial").exists()
    fresh = build_datastore(params, world["features"], world["clip"], world["gpt"], tmp_path / "fresh", Rank(),
                            progress=False)
    assert fresh["chunks_encoded"] == 3
    assert (out / "index.faiss").read_bytes() == (tmp_path / "fresh" / "index.faiss").read_bytes()
    again = build_datastore(params, world["features"], world["clip"], world["gpt"], out, Rank(), progress=False)
    assert again["kept"] and again["chunks_encoded"] == 0


def test_retrieve_keeps_current_shards_and_splits_shards_by_rank(world, tmp_path):
    import shutil

    from pipeline.core.runtime import Rank
    from pipeline.retrieval.run import run_retrieve

    out = tmp_path / "retrieval"
    metrics = tmp_path / "retrieve.json"
    for r in (0, 1):
        run_retrieve(world["params"], world["features"], world["tmp"] / "datastore", out, metrics, Rank(r, 2))
    per_rank = [json.loads((tmp_path / f"retrieve.rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["shards_written"] for m in per_rank] == [1, 1]
    for name in ("00000.h5", "00001.h5"):
        assert _neighbours_file(out / name) == _neighbours_file(world["tmp"] / "retrieval" / name)
    run_retrieve(world["params"], world["features"], world["tmp"] / "datastore", out, metrics, Rank())
    assert json.loads(metrics.read_text())["shards_kept"] == 2
    # Other settings remake the shards.
    run_retrieve(_params(k=3), world["features"], world["tmp"] / "datastore", out, metrics, Rank())
    assert json.loads(metrics.read_text())["shards_written"] == 2
    shutil.rmtree(out)


def _neighbours_file(path: Path) -> tuple:
    from pipeline.formats.neighbours import read_neighbour_shard

    t = read_neighbour_shard(path)
    return t.keys, t.ids.tolist(), t.captions


def test_capline_datastore_and_retrieve_commands(world, tmp_path):
    import yaml
    from click.testing import CliRunner

    from stages.cli import capline

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"device": "cpu", "retrieval": {"batch_size": 8, "index": "ivf",
                                                                      "ivf_nlist": 2, "ivf_nprobe": 2}}))
    runner = CliRunner()
    with torch_threads(1):
        result = runner.invoke(capline, ["datastore", "--params", str(params), "--features", str(world["features"]),
                                         "--clip", str(world["clip"]), "--gpt", str(world["gpt"]),
                                         "--out", str(tmp_path / "ds"), "--metrics", str(tmp_path / "ds.json")])
        assert result.exit_code == 0, result.output
        result = runner.invoke(capline, ["retrieve", "--params", str(params), "--features", str(world["features"]),
                                         "--datastore", str(tmp_path / "ds"), "--out", str(tmp_path / "nb"),
                                         "--metrics", str(tmp_path / "nb.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ds.json").read_text())["index"] == "IndexIVFFlat"
    assert json.loads((tmp_path / "nb.json").read_text())["images"] == len(world["keys"])
    result = runner.invoke(capline, ["retrieve", "--params", str(params), "--features", str(world["features"]),
                                     "--datastore", str(tmp_path / "none"), "--out", str(tmp_path / "nb2"),
                                     "--metrics", str(tmp_path / "nb2.json")])
    assert result.exit_code == 1 and "run `capline datastore` first" in result.output


def test_torchrun_two_processes_equal_one(world, tmp_path):
    """Under torchrun the ranks encode alternate chunks and rank 0 builds the index; retrieve splits
    the feature shards; both give what one process gives, and one metrics file each."""
    import yaml

    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.retrieval.retrieve import retrieve_shards
    from tests.helpers.torchrun import run_torchrun, standalone

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"device": "cpu", "retrieval": {"batch_size": 1, "k": 4}}))  # 24 captions: 2 chunks
    paths = ["--features", str(world["features"])]
    run_torchrun(standalone(2, ["datastore", "--params", str(params), *paths, "--clip", str(world["clip"]),
                                "--gpt", str(world["gpt"]), "--out", str(tmp_path / "ds"),
                                "--metrics", str(tmp_path / "ds.json")]), tmp_path)
    run_torchrun(standalone(2, ["retrieve", "--params", str(params), *paths, "--datastore", str(tmp_path / "ds"),
                                "--out", str(tmp_path / "nb"), "--metrics", str(tmp_path / "nb.json")]), tmp_path)
    ds = json.loads((tmp_path / "ds.json").read_text())
    assert (ds["chunks"], ds["chunks_encoded"], ds["world_size"], ds["built"]) == (2, 1, 2, True)  # rank 0: chunk 0
    nb = json.loads((tmp_path / "nb.json").read_text())
    assert (nb["world_size"], nb["shards_written"], nb["images"]) == (2, 2, len(world["keys"]))
    assert not list(tmp_path.glob("*.rank*.json"))

    one = _params(batch_size=1)
    build_datastore(one, world["features"], world["clip"], world["gpt"], tmp_path / "ds1", Rank(), progress=False)
    assert (tmp_path / "ds" / "index.faiss").read_bytes() == (tmp_path / "ds1" / "index.faiss").read_bytes()
    retrieve_shards(one.retrieval, world["features"], tmp_path / "ds1", tmp_path / "nb1", Rank(), progress=False)
    for name in ("00000.h5", "00001.h5"):
        assert _neighbours_file(tmp_path / "nb" / name) == _neighbours_file(tmp_path / "nb1" / name)


def test_an_open_clip_folder_encodes_the_datastore_with_its_own_text_tower(world, tmp_path):
    """A pinned open_clip CLIP: the datastore's vectors are open_clip's own encode_text, normalised."""
    import torch

    from pipeline.core.runtime import Rank
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.retrieval.store import Datastore
    from tests.helpers.openclip import TINY_VIT, pin_open_clip_folder, reference_open_clip, register_tiny_models

    register_tiny_models(tmp_path / "configs")
    clip = pin_open_clip_folder(tmp_path / "clip", f"open_clip:{TINY_VIT}/random-3")
    source = tmp_path / "captions.txt"
    texts = ["a red circle", "one blue square here", "a green triangle on the left", "a yellow circle"]
    source.write_text("\n".join(texts) + "\n")
    build_datastore(_params(source=str(source), batch_size=3), world["features"], clip, world["gpt"],
                    tmp_path / "store", Rank(), progress=False)
    store = Datastore.load(tmp_path / "store")
    assert store.manifest["dim"] == 16 and store.manifest["model_id"].startswith("open_clip:")
    model, _, tokenizer = reference_open_clip(clip)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1).numpy()
    assert np.allclose(store.index.reconstruct_n(0, 4), want, atol=1e-5)
