"""The retrieval captioner: [prefix] + prompt(k captions) + caption, trained and decoded.

k=0 is the plain captioner (same logits); the loss covers the caption only; a row's
logits and captions do not depend on the other prompts of its batch; the model folder
records its retrieval settings and datastore; another datastore can be swapped in,
and one of another CLIP is refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.core.files import CAPTIONED_WITH_FILE
from pipeline.core.params import GenerateParams, MapperParams, RetrievalParams, TrainParams
from pipeline.formats.neighbours import NeighbourTable, write_neighbour_shard
from pipeline.generate.run import caption_vectors, run as generate
from pipeline.models.captioner import ClipCaptioner
from pipeline.models.prompt import RetrievalSettings, pad_left
from pipeline.retrieval.store import DatastoreError, write_datastore
from pipeline.text.decoding import prepare_for_inference
from pipeline.train.run import train
from tests.helpers.features import COLOURS, SHAPES, scene_table, with_patch_tokens, write_features
from tests.helpers.models import load_tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The tiny GPT-2 knows the scene words only: a template of scene words (the others would be <unk>).
TEMPLATE = "a {captions} here one"
RETRIEVAL = RetrievalParams(k=2, template=TEMPLATE, max_caption_tokens=6)
GEN = GenerateParams(split="test", batch_size=5, num_beams=3, max_new_tokens=8, precision="fp32")
DATASTORE_ID = {"fingerprint": "f" * 64, "model_id": "test/clip", "model_revision": "0" * 64}


def neighbours_of(table, k: int = 2) -> list[list[str]]:
    """Each image's k neighbours: captions of its own class in both wordings, of different lengths
    from image to image (the prompts of a batch differ in length)."""
    out = []
    for i, key in enumerate(table.keys):
        c, s = table.captions[i][0].split()[1:3]
        long, short = f"one {c} {s} here", f"a {c} {s}"
        out.append([long, short][:k] if i % 2 else [short, short, long][:k])
    return out


def write_neighbours(folder, features, table, k: int = 2):
    """Neighbour shards for the feature shards in ``features`` (same stems, same key order)."""
    from pipeline.formats.features import read_feature_shard

    folder.mkdir(parents=True, exist_ok=True)
    by_key = dict(zip(table.keys, neighbours_of(table, k)))
    for shard in sorted(features.glob("*.h5")):
        meta = read_feature_shard(shard, embeddings=False)
        n = len(meta.keys)
        write_neighbour_shard(folder / shard.name, NeighbourTable(
            keys=meta.keys, splits=meta.splits, ids=np.zeros((n, k), np.int64), scores=np.zeros((n, k), np.float32),
            captions=[by_key[key] for key in meta.keys],
            attrs={"made_from": json.dumps({"datastore": DATASTORE_ID["fingerprint"]}), "k": k,
                   "model_id": DATASTORE_ID["model_id"], "model_revision": DATASTORE_ID["model_revision"]}))
    return folder


def make_datastore(folder, table, model_id="test/clip"):
    """A datastore whose captions are the scene captions, each at its class direction."""
    import faiss

    texts, vectors = [], []
    for i, caps in enumerate(table.captions):
        for cap in caps:
            texts.append(cap)
            vectors.append(table.embeddings[i])
    index = faiss.IndexFlatIP(table.embeddings.shape[1])
    index.add(np.stack(vectors).astype(np.float32))
    from pipeline.retrieval.captions import Caption

    manifest = {"model_id": model_id, "model_revision": "0" * 64, "dim": int(index.d), "fingerprint": "d" * 64,
                "index": {"kind": "flat", "type": "IndexFlatIP"}}
    write_datastore(folder, index, [Caption(key=None, text=t) for t in texts], manifest)
    return folder


def tiny_model(tiny_gpt_dir, k: int, mapper: str = "mlp", seed: int = 0) -> ClipCaptioner:
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(seed)
    settings = RetrievalSettings(k=k, template=TEMPLATE, max_caption_tokens=6) if k else None
    return ClipCaptioner.from_settings(MapperParams(type=mapper, prefix_length=3).model_dump(), 16, gpt, tok,
                                       retrieval=settings).eval()


def caption_batch(model, captions):
    from pipeline.models.captioner import tokenize_captions

    rows = tokenize_captions(model.tokenizer, captions, 10)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def test_k0_is_the_plain_captioner(tiny_gpt_dir):
    """k=0: the logits of today's computation (cat(prefix, tokens), GPT-2's own positions), exactly."""
    model = tiny_model(tiny_gpt_dir, k=0)
    vectors = torch.randn(3, 16)
    ids, mask = caption_batch(model, ["a red circle", "one blue square here", "a green triangle"])
    with torch.no_grad():
        prefix = model.prefix(vectors)
        embeds = torch.cat([prefix, model.gpt.get_input_embeddings()(ids)], dim=1)
        full = torch.cat([torch.ones(3, prefix.shape[1], dtype=torch.long), mask], dim=1)
        hidden = model.gpt.base_model(inputs_embeds=embeds, attention_mask=full).last_hidden_state
        today = model.gpt.get_output_embeddings()(hidden[:, prefix.shape[1] - 1:-1][mask.bool()])
        assert torch.equal(model._real_token_logits(vectors, ids, mask), today)
    assert model.prompt_room == 0 and model.caption_room == 64 - 3
    assert model.config_dict()["retrieval"]["k"] == 0


def test_loss_covers_the_caption_not_the_prompt(tiny_gpt_dir):
    """One row: the loss equals GPT-2's own loss over [prefix, prompt, caption] with labels on the caption only."""
    model = tiny_model(tiny_gpt_dir, k=2)
    vectors = torch.randn(1, 16)
    ids, mask = caption_batch(model, ["a red circle"])
    prompt_ids = model.prompt_ids([["one red circle here", "a red square"]])
    prompt = pad_left(prompt_ids, model.pad_token_id)
    with torch.no_grad():
        ours = model(vectors, ids, mask, prompt=prompt)
        prefix = model.prefix(vectors)
        tokens = torch.cat([prompt[0], ids], dim=1)
        embeds = torch.cat([prefix, model.gpt.get_input_embeddings()(tokens)], dim=1)
        labels = torch.cat([torch.full((1, prefix.shape[1] + prompt[0].shape[1]), -100), ids], dim=1)
        theirs = model.gpt(inputs_embeds=embeds, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    # Per-token scores cover the caption's tokens only.
    assert model(vectors, ids, mask, reduction="tokens", prompt=prompt).shape == ids.shape


def test_a_rows_logits_do_not_depend_on_the_other_prompts(tiny_gpt_dir):
    """Prompts of different lengths in one batch: each row reads as it does alone (mask and positions)."""
    model = tiny_model(tiny_gpt_dir, k=2)
    vectors = torch.randn(3, 16)
    ids, mask = caption_batch(model, ["a red circle", "one blue square here", "a green triangle"])
    prompts = model.prompt_ids([["a red circle", "a red circle"], ["one blue square here", "one blue circle here"],
                                ["a green triangle", "one green triangle here"]])
    assert len({len(p) for p in prompts}) == 3
    with torch.no_grad():
        batch = model(vectors, ids, mask, reduction="tokens", prompt=pad_left(prompts, model.pad_token_id))
        for i in range(3):
            n = int(mask[i].sum())
            alone = model(vectors[i:i + 1], ids[i:i + 1, :n], mask[i:i + 1, :n], reduction="tokens",
                          prompt=pad_left(prompts[i:i + 1], model.pad_token_id))
            torch.testing.assert_close(batch[i, :n], alone[0], atol=1e-5, rtol=0)


def test_prompt_is_the_template_with_the_captions(tiny_gpt_dir):
    model = tiny_model(tiny_gpt_dir, k=2)
    ids = model.prompt_ids([["a red circle", "one blue square here", "ignored beyond k"]])[0]
    assert model.tokenizer.decode(ids) == "a a red circle \n\n one blue square here here one"  # separator: a blank line
    assert len(ids) <= model.prompt_room
    smallcap = RetrievalSettings(k=2, template=RetrievalParams().template, max_caption_tokens=25)
    assert smallcap.text(["a dog", "a cat"]) == "Similar images show\n\na dog\n\na cat.\n\nThis image shows "


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gpt_dir):
    """A k=2 mlp captioner trained on the scene task with neighbour shards."""
    root = tmp_path_factory.mktemp("rag")
    table = scene_table(n_per_class=6)
    feats = write_features(root / "features", table)
    neighbours = write_neighbours(root / "retrieval", feats, table)
    params = TrainParams(epochs=30, batch_size=8, lr=3e-3, warmup_steps=5, precision="fp32", finetune_gpt=True)
    train(feats, tiny_gpt_dir, root / "model", root / "loss.csv", root / "train.json",
          MapperParams(type="mlp", prefix_length=2), params, progress=False, retrieval=RETRIEVAL,
          retrieval_dir=neighbours)
    return root, feats, neighbours, table


def test_model_folder_records_its_retrieval(trained):
    root, feats, neighbours, table = trained
    saved = json.loads((root / "model" / "captioner.json").read_text())["retrieval"]
    assert saved == {"k": 2, "template": TEMPLATE, "max_caption_tokens": 6, "separator": "\n\n",
                     "datastore": DATASTORE_ID}
    model = ClipCaptioner.load(root / "model")
    assert model.retrieval.to_dict() == saved
    assert model.caption_room == 64 - 2 - model.prompt_room


def test_batch_size_does_not_change_a_caption(trained):
    """Variable-length prompts, beams sharing the context's cache: batch 1 equals batch 5."""
    root, feats, neighbours, table = trained
    model = prepare_for_inference(ClipCaptioner.load(root / "model"), torch.device("cpu"), "fp32")
    prompts = model.prompt_ids(neighbours_of(table))[:12]
    assert len({len(p) for p in prompts}) > 1
    params = GEN.model_copy(update={"num_return_sequences": 3})
    keys = table.keys[:12]
    one = caption_vectors(model, table.embeddings[:12], params.model_copy(update={"batch_size": 1}), keys, False,
                          prompts=prompts)
    many = caption_vectors(model, table.embeddings[:12], params, keys, False, prompts=prompts)
    assert [[c.text for c in caps] for caps in one] == [[c.text for c in caps] for caps in many]
    assert [c.score for caps in one for c in caps] == pytest.approx([c.score for caps in many for c in caps],
                                                                    abs=1e-4)


def test_generate_reads_the_neighbour_shards(trained, tmp_path):
    root, feats, neighbours, table = trained
    metrics = generate(root / "model", feats, tmp_path / "c", GEN, progress=False, retrieval_dir=neighbours)
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert metrics["captions"] == len(results) == table.splits.count("test")
    # What evaluate reports: k, and the datastore the prompts came from (the training one).
    assert metrics["retrieval_k"] == 2
    assert json.loads((tmp_path / "c" / CAPTIONED_WITH_FILE).read_text()) == {
        "retrieval_k": 2, "datastore": DATASTORE_ID["fingerprint"]}
    right = 0
    for row in results:
        i = table.keys.index(row["image_id"])
        c, s = table.captions[i][0].split()[1:3]
        right += c in row["caption"].split() and s in row["caption"].split()
    assert right >= 0.5 * len(results), results  # 12 classes: chance is 1/12


def test_generate_with_a_swapped_datastore(trained, tmp_path):
    root, feats, neighbours, table = trained
    store = make_datastore(tmp_path / "store", table)
    metrics = generate(root / "model", feats, tmp_path / "c", GEN.model_copy(update={"datastore": str(store)}),
                       progress=False)
    assert metrics["captions"] == table.splits.count("test")
    swapped = json.loads((store / "manifest.json").read_text())["fingerprint"]
    assert swapped != DATASTORE_ID["fingerprint"]
    assert json.loads((tmp_path / "c" / CAPTIONED_WITH_FILE).read_text())["datastore"] == swapped


def test_a_datastore_of_another_clip_is_refused(trained, tmp_path):
    root, feats, neighbours, table = trained
    store = make_datastore(tmp_path / "store", table, model_id="other/clip")
    with pytest.raises(DatastoreError, match="other/clip.*test/clip"):
        generate(root / "model", feats, tmp_path / "c", GEN.model_copy(update={"datastore": str(store)}),
                 progress=False)


@pytest.mark.parametrize("mapper", [MapperParams(type="cross_attention", prefix_length=2, reduce_factor=4),
                                    MapperParams(type="transformer", prefix_length=2, clip_length=2, layers=1, heads=2),
                                    MapperParams(type="clipgpt", prefix_length=2, layers=1, heads=2)],
                         ids=lambda m: m.type)
def test_every_mapper_trains_and_captions_with_retrieval(tmp_path, tiny_gpt_dir, mapper):
    table = scene_table(n_per_class=3, dim=32 if mapper.type == "clipgpt" else 16)  # clipgpt: GPT-2's width
    if mapper.type == "cross_attention":
        table = with_patch_tokens(table)
    feats = write_features(tmp_path / "features", table)
    neighbours = write_neighbours(tmp_path / "retrieval", feats, table)
    params = TrainParams(epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32")
    train(feats, tiny_gpt_dir, tmp_path / "model", tmp_path / "loss.csv", tmp_path / "train.json",
          mapper, params, progress=False, retrieval=RETRIEVAL, retrieval_dir=neighbours)
    assert ClipCaptioner.load(tmp_path / "model").retrieval.k == 2
    metrics = generate(tmp_path / "model", feats, tmp_path / "c", GEN, progress=False, retrieval_dir=neighbours)
    assert metrics["captions"] == table.splits.count("test")


# ------------------------------------------------------------------- capline caption
def caption_datastore(folder, clip_dir, vectors, texts, model_id=None):
    """A datastore of ``texts`` at ``vectors``, made (as its manifest says) with ``clip_dir``'s CLIP."""
    import faiss

    from pipeline.models.pretrained import model_identity
    from pipeline.retrieval.captions import Caption

    clip_id, revision = model_identity(clip_dir)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    manifest = {"model_id": model_id or clip_id, "model_revision": revision, "dim": int(index.d),
                "fingerprint": folder.name * 8, "index": {"kind": "flat", "type": "IndexFlatIP"}}
    write_datastore(folder, index, [Caption(key=None, text=t) for t in texts], manifest)
    return folder


@pytest.fixture(scope="module")
def caption_setup(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    from PIL import Image

    from tests.helpers.models import clip_feature_attrs, copy_model

    root = tmp_path_factory.mktemp("rag-caption")
    clip_dir = copy_model(hub_clip_dir, root / "clip")
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok,
                                        features=clip_feature_attrs(clip_dir, 16), finetune_gpt=True,
                                        retrieval=RetrievalSettings(k=2, template=TEMPLATE, max_caption_tokens=6,
                                                                    datastore=DATASTORE_ID))
    model.save(root / "model", clip_dir=clip_dir)
    return root, clip_dir, images


def test_caption_searches_the_datastore_it_is_given(caption_setup):
    from pipeline.caption.run import ImageEmbedder, caption_inputs
    from pipeline.core.params import Decoding
    from pipeline.retrieval.search import datastore_neighbours
    from pipeline.retrieval.store import Datastore

    root, clip_dir, images = caption_setup
    model = ClipCaptioner.load(root / "model")
    embedder = ImageEmbedder(clip_dir, model.features, torch.device("cpu"))
    vectors = torch.cat([embedder([embedder.pre.to_uint8(open(p, "rb").read())]) for p in images]).numpy()
    scenes = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    rng = np.random.default_rng(1)
    stores = {}
    for name, texts in (("one", scenes[:6]), ("two", scenes[6:])):
        noise = rng.normal(size=(6, vectors.shape[1])).astype(np.float32)
        store_vectors = np.concatenate([vectors, vectors]) + 0.1 * noise
        stores[name] = caption_datastore(root / name, clip_dir, store_vectors, texts)
    d = Decoding(num_beams=2, num_return_sequences=2, max_new_tokens=6)
    got = {}
    for name, folder in stores.items():
        results = caption_inputs(root / "model", images, d, precision="fp32", progress=False, datastore_dir=folder)
        neighbours = datastore_neighbours(Datastore.load(folder), vectors, 2)
        want = caption_vectors_with(model, vectors, d, neighbours)
        got[name] = [r.captions for r in results]
        assert [[c.text for c in caps] for caps in got[name]] == [[c.text for c in caps] for caps in want]
        assert [c.score for caps in got[name] for c in caps] == pytest.approx(
            [c.score for caps in want for c in caps], abs=1e-4)
    # The prompts come from the datastore given (the untrained model's scores show it).
    assert [c.score for caps in got["one"] for c in caps] != pytest.approx(
        [c.score for caps in got["two"] for c in caps], abs=1e-3)


def caption_vectors_with(model, vectors, d, neighbours):
    from pipeline.text.decoding import decode_batch

    return decode_batch(model, torch.from_numpy(vectors), d, [""] * len(vectors), prompts=model.prompt_ids(neighbours))


def test_caption_refuses_a_datastore_of_another_clip_and_needs_one(caption_setup):
    from pipeline.caption.run import CaptionInputError, caption_inputs

    root, clip_dir, images = caption_setup
    other = caption_datastore(root / "other", clip_dir, np.eye(3, 16, dtype=np.float32), ["a", "b", "c"],
                              model_id="other/clip")
    with pytest.raises(DatastoreError, match="other/clip.*reads vectors of CLIP clip"):
        caption_inputs(root / "model", images, progress=False, datastore_dir=other)
    with pytest.raises(CaptionInputError, match="--datastore"):
        caption_inputs(root / "model", images, progress=False)


def test_export_and_serve_refuse_a_retrieval_model(caption_setup, tmp_path):
    from pipeline.export.onnx import export_onnx
    from pipeline.models.pretrained import ModelError
    from pipeline.serve.app import ServeOptions
    from pipeline.serve.run import build_service

    root, clip_dir, images = caption_setup
    with pytest.raises(ModelError, match="retrieved captions"):
        export_onnx(root / "model", tmp_path / "onnx")
    with pytest.raises(ModelError, match="retrieved captions"):
        build_service(root / "model", ServeOptions())


def test_scst_scores_each_sample_with_its_prompt(trained):
    """What SCST's loss weighs (token_logprobs with the image's prompt repeated for its samples)
    equals the log-probabilities the samples were drawn with through generate with the prompts."""
    from pipeline.core.params import Decoding
    from pipeline.scst.rewards import caption_mask
    from pipeline.text.decoding import generate_ids

    root, feats, neighbours, table = trained
    model = ClipCaptioner.load(root / "model")
    vectors = torch.from_numpy(table.embeddings[:6])
    prompts = model.prompt_ids(neighbours_of(table)[:6])
    d = Decoding(num_beams=1, do_sample=True, num_return_sequences=3, max_new_tokens=8, top_k=0, top_p=1.0)
    ids, sampler = generate_ids(model, vectors, d, keys=[str(i) for i in range(6)], prompts=prompts)
    mask = caption_mask(ids, model.eos_token_id)
    theirs = torch.stack(sampler.token_logprobs, dim=1)[:, :ids.shape[1]] * mask
    prompt = pad_left([p for p in prompts for _ in range(3)], model.pad_token_id)
    ours = model.token_logprobs(vectors.repeat_interleave(3, dim=0), ids.clone(), mask, prompt)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="needs Java (the PTB tokenizer)")
def test_scst_trains_a_retrieval_model(trained, tmp_path):
    from pipeline.core.params import ScstParams
    from pipeline.scst.run import scst

    root, feats, neighbours, table = trained
    params = ScstParams(epochs=1, batch_size=8, samples=2, max_tokens=8, precision="fp32")
    scst(root / "model", feats, tmp_path / "model", tmp_path / "reward.csv", tmp_path / "val.csv",
         tmp_path / "scst.json", params, progress=False, retrieval_dir=neighbours)
    assert ClipCaptioner.load(tmp_path / "model").retrieval.k == 2


def test_training_with_k0_is_todays_training(tmp_path, tiny_gpt_dir):
    """retrieval.k 0 (the default) trains the same weights and captions as training without retrieval."""
    table = scene_table(n_per_class=3)
    feats = write_features(tmp_path / "features", table)
    params = TrainParams(epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32")
    mapper = MapperParams(type="mlp", prefix_length=2)
    for name, retrieval in (("plain", None), ("k0", RetrievalParams(k=0))):
        train(feats, tiny_gpt_dir, tmp_path / name, tmp_path / f"{name}.csv", tmp_path / f"{name}.json", mapper,
              params, progress=False, retrieval=retrieval, retrieval_dir=tmp_path / "absent")
    assert (tmp_path / "plain/mapper.safetensors").read_bytes() == (tmp_path / "k0/mapper.safetensors").read_bytes()
    caps = [generate(tmp_path / name, feats, tmp_path / f"c-{name}", GEN, progress=False) and
            (tmp_path / f"c-{name}" / "results.json").read_text() for name in ("plain", "k0")]
    assert caps[0] == caps[1]
