"""The domain-transfer experiment: domain B's wording, the demo models that learn it, and the
transfer stage (B's test images captioned with A's datastore and with B's, scored by CIDEr)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.core.errors import ParamsError
from pipeline.core.params import DemoClip, DemoGpt, parse_params
from pipeline.prepare.scenes import COLOUR_WORDS_B, captions_for, scene_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B_WORDS = set(COLOUR_WORDS_B.values())
A_WORDS = set(COLOUR_WORDS_B)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_domain_b_captions_are_a_captions_with_the_colours_renamed():
    for index in range(60):
        scene = scene_for(index, seed=4)
        a = captions_for(scene, 7, 4)
        b = captions_for(scene, 7, 4, COLOUR_WORDS_B)
        renamed = [" ".join(COLOUR_WORDS_B.get(w, w) for w in c.split(" ")) for c in a]
        # Articles follow the new word ("an emerald"), the rest is the same draw.
        assert [re.sub(r"\ban? ", "A ", c) for c in b] == [re.sub(r"\ban? ", "A ", c) for c in renamed]
        assert not any(words(c) & B_WORDS for c in a)
        assert all(words(c) & B_WORDS and not words(c) & A_WORDS for c in b)


def test_demo_pretraining_learns_both_wordings_only_when_asked():
    from pipeline.pin.demo import _pretrain_scenes, gpt_pretrain_documents

    gpt = DemoGpt(pretrain_documents=40)
    plain = gpt_pretrain_documents(gpt)
    both = gpt_pretrain_documents(gpt, COLOUR_WORDS_B)
    assert not any(words(d) & B_WORDS for d in plain)
    # Every other document is in B's wording throughout, the others are unchanged.
    assert both[0::2] == plain[0::2]
    assert all(words(d) & B_WORDS and not words(d) & A_WORDS for d in both[1::2])

    clip = DemoClip(pretrain_images=80)
    _, scenes, captions = _pretrain_scenes(clip)
    _, scenes_b, captions_b = _pretrain_scenes(clip, COLOUR_WORDS_B)
    assert scenes_b == scenes
    b_worded = [any(words(c) & B_WORDS for c in caps) for caps in captions_b]
    assert b_worded == [(i // 2) % 2 == 1 for i in range(len(scenes))]  # every other scene-and-twin pair


def test_transfer_needs_the_demo_dataset():
    with pytest.raises(ParamsError, match="transfer.domain.*data.source is 'coco'"):
        parse_params({"data": {"source": "coco", "annotations": "x.json"}, "transfer": {"domain": "colours"}})


# ------------------------------------------------------------------------ the stage
TEMPLATE = "a {captions} here one"


def transfer_params(k: int):
    return parse_params({
        "data": {"demo": {"image_size": 32}},
        "retrieval": {"k": k, "template": TEMPLATE, "max_caption_tokens": 40, "retrieve_candidates": 4},
        "generate": {"num_beams": 2, "max_new_tokens": 6, "precision": "fp32", "batch_size": 8},
        "transfer": {"domain": "colours", "images": 120, "seed": 3},
    })


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    """A retrieval model (k=2, untrained: its captions follow its prompts), A's datastore made
    with its CLIP from the demo's captions, and the transfer stage's output."""
    from pipeline.core.files import write_json
    from pipeline.core.params import MapperParams
    from pipeline.core.runtime import current_rank
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.models.prompt import RetrievalSettings
    from pipeline.retrieval.datastore import build_datastore
    from pipeline.transfer.run import run
    from tests.helpers.models import clip_feature_attrs, copy_model, load_tiny_gpt

    root = tmp_path_factory.mktemp("transfer")
    clip_dir = copy_model(hub_clip_dir, root / "clip")
    params = transfer_params(k=2)
    a_captions = [{"id": i, "image_id": i // 3, "caption": c}
                  for i, c in enumerate(c for n in range(40) for c in captions_for(scene_for(n, 0), 3, 0))]
    write_json(root / "a_captions.json", {"annotations": a_captions})
    a_params = params.model_copy(update={"retrieval": params.retrieval.model_copy(
        update={"source": str(root / "a_captions.json")})})
    build_datastore(a_params, root, clip_dir, tiny_gpt_dir, root / "datastore_a", current_rank(), progress=False)

    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok,
                                        features=clip_feature_attrs(clip_dir, 16), finetune_gpt=True,
                                        retrieval=RetrievalSettings(k=2, template=TEMPLATE, max_caption_tokens=12))
    model.save(root / "model", clip_dir=clip_dir)
    summary = run(params, root / "model", root / "datastore_a", clip_dir, tiny_gpt_dir, root / "out", progress=False)
    return root, params, summary


def read(path):
    return json.loads(path.read_text())


def test_bs_datastore_holds_bs_training_captions_only(setup):
    from pipeline.retrieval.store import Datastore
    from pipeline.transfer.domain import domain_images

    root, params, summary = setup
    images = domain_images(params)
    store = Datastore.load(root / "out" / "datastore")
    train = sorted(c for im in images if im.split == "train" for c in im.captions)
    assert sorted(store.texts) == train
    test_keys = {im.key for im in images if im.split == "test"}
    assert set(store.keys).isdisjoint(test_keys)  # no test image's caption can be retrieved
    assert summary["datastore_captions"] == len(store) == len(train)
    assert summary["test_images"] == len(test_keys) == len(read(root / "out" / "references.json")["images"])


def test_captions_are_capline_captions_with_each_datastore(setup, tmp_path):
    """What the stage wrote for each datastore is what `capline caption --datastore` gives
    for B's test images, and the two datastores give different captions."""
    from pipeline.caption.run import caption_inputs
    from pipeline.transfer.domain import domain_images, image_bytes

    root, params, _ = setup
    test = [im for im in domain_images(params) if im.split == "test"]
    paths = []
    for im in test:
        path = tmp_path / f"{im.key}.png"
        path.write_bytes(image_bytes(im, params))
        paths.append(str(path))
    got = {}
    for name, store in (("source", root / "datastore_a"), ("own", root / "out" / "datastore")):
        results = caption_inputs(root / "model", paths, params.generate, precision="fp32", progress=False,
                                 datastore_dir=store)
        written = read(root / "out" / f"results_{name}_datastore.json")
        assert [r["image_id"] for r in written] == [im.key for im in test]
        assert [r["caption"] for r in written] == [r.texts[0] for r in results]
        got[name] = [r.texts[0] for r in results]
    assert got["own"] != got["source"]


def test_figures_are_pycocoevalcap_cider_of_the_written_files(setup):
    from pycocoevalcap.cider.cider import Cider

    from pipeline.evaluate.scores import tokenize_groups

    root, _, summary = setup
    refs = read(root / "out" / "references.json")
    gts: dict = {}
    for ann in refs["annotations"]:
        gts.setdefault(ann["image_id"], []).append(ann["caption"])
    gts = tokenize_groups(gts)
    cider = {}
    for name in ("own", "source"):
        res = tokenize_groups({r["image_id"]: [r["caption"]] for r in read(root / "out" / f"results_{name}_datastore.json")})
        cider[name] = Cider().compute_score(gts, {k: res[k] for k in gts})[0]
    assert summary["transfer_cider"] == pytest.approx(cider["own"], abs=1e-9)
    assert summary["transfer_cider_source_datastore"] == pytest.approx(cider["source"], abs=1e-9)
    assert summary["transfer_ratio"] == pytest.approx(cider["own"] / cider["source"])
    assert read(root / "out" / "transfer.json") == summary


def test_a_model_without_retrieval_captions_b_once(setup, tiny_gpt_dir, tmp_path):
    from pipeline.core.params import MapperParams
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.transfer.run import run
    from tests.helpers.models import clip_feature_attrs, load_tiny_gpt

    root, _, _ = setup
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok,
                                        features=clip_feature_attrs(root / "clip", 16))
    model.save(tmp_path / "model", clip_dir=root / "clip")
    summary = run(transfer_params(k=0), tmp_path / "model", root / "datastore_a", root / "clip", tiny_gpt_dir,
                  tmp_path / "out", progress=False)
    assert summary["retrieval_k"] == 0 and summary["datastore_captions"] == 0
    assert summary["transfer_cider"] == summary["transfer_cider_source_datastore"]
    assert summary["transfer_ratio"] == 1.0
    assert not (tmp_path / "out" / "datastore").exists()


def test_domain_none_writes_null_figures_and_evaluate_copies_them(tmp_path):
    from pipeline.evaluate.run import transfer_figures
    from pipeline.transfer.run import run

    summary = run(parse_params({}), tmp_path / "no-model", tmp_path / "no-store", tmp_path, tmp_path, tmp_path / "t")
    assert summary["transfer_cider"] is None and "transfer.domain is none" in summary["skipped"]
    assert transfer_figures(tmp_path / "t" / "transfer.json") == dict.fromkeys(
        ("transfer_cider", "transfer_cider_source_datastore", "transfer_ratio"))
    (tmp_path / "t.json").write_text(json.dumps({"transfer_cider": 2.5, "transfer_cider_source_datastore": 2.0,
                                                 "transfer_ratio": 1.25, "domain": "colours"}))
    assert transfer_figures(tmp_path / "t.json") == {"transfer_cider": 2.5, "transfer_cider_source_datastore": 2.0,
                                                     "transfer_ratio": 1.25}
    assert transfer_figures(tmp_path / "absent.json")["transfer_ratio"] is None


def test_the_b_words_share_counts_captions_naming_a_b_colour():
    from pipeline.transfer.run import _share_with

    assert _share_with(["a crimson circle", "a red circle", "an Emerald box", "navyblue"], B_WORDS) == 0.5
    assert _share_with([], B_WORDS) is None
