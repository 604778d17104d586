"""open_clip encoders (``clip.model: open_clip:NAME/TAG``): the spec checked at params load,
pinned folders that load offline with the same weights, preprocessing equal to open_clip's
eval transform, embed / CLIPScore / caption equal to open_clip's plain path, and ClipCap's
RN50x4 transformer release imported with an RN50x4 folder. Tiny registered architectures
with random weights: nothing is downloaded."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.params import ParamsError, parse_params
from pipeline.models.pretrained import ModelError, load_clip, model_identity, read_pin, weights_sha256
from tests.helpers.images import make_image_dir, photo_jpeg
from tests.helpers.openclip import (TINY_RN, TINY_VIT, pin_open_clip_folder, reference_image_vectors,
                                    reference_open_clip, register_tiny_models)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    register_tiny_models(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory, registered):
    return pin_open_clip_folder(tmp_path_factory.mktemp("oc-vit") / "clip", f"open_clip:{TINY_VIT}/random-3")


@pytest.fixture(scope="module")
def rn_dir(tmp_path_factory, registered):
    return pin_open_clip_folder(tmp_path_factory.mktemp("oc-rn") / "clip", f"open_clip:{TINY_RN}/random")


def image_bytes() -> list[bytes]:
    """Sizes that crop an odd number of pixels, portrait and landscape, an image already at
    the model's size, and the modes open_clip converts only after the resize (L, P, RGBA)."""
    rng = np.random.default_rng(0)
    out = [photo_jpeg(1, 97, 70), photo_jpeg(2, 33, 80), photo_jpeg(3, 64, 64)]
    for mode, size in (("L", (70, 45)), ("P", (51, 66)), ("RGBA", (90, 65)), ("RGB", (35, 32))):
        arr = rng.integers(0, 255, size=(size[1], size[0], 4), dtype=np.uint8)
        im = Image.fromarray(arr, "RGBA").convert(mode)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------- params
@pytest.mark.parametrize("spec", ["open_clip:RN50x4", "open_clip:/openai", "open_clip:RN50x4/", "open_clip:a/b/c"])
def test_a_malformed_spec_is_refused_at_params_load(spec):
    with pytest.raises(ParamsError, match=r"clip\.model: expected open_clip:NAME/TAG \(e\.g\. open_clip:RN50x4/openai"):
        parse_params({"clip": {"model": spec}})
    assert parse_params({"clip": {"model": "open_clip:ViT-B-32/laion2b_s34b_b79k"}}).clip.model.endswith("b79k")


def test_settings_an_open_clip_model_cannot_honour_are_refused():
    with pytest.raises(ParamsError, match="clip.output: 'pooler_output' has no open_clip counterpart"):
        parse_params({"clip": {"model": "open_clip:RN50x4/openai", "output": "pooler_output"}})
    with pytest.raises(ParamsError, match="clip.revision: 'v2'.*leave clip.revision at main"):
        parse_params({"clip": {"model": "open_clip:RN50x4/openai", "revision": "v2"}})
    with pytest.raises(ParamsError, match="gpt.model: open_clip models are CLIPs"):
        parse_params({"gpt": {"model": "open_clip:RN50x4/openai"}})


# -------------------------------------------------------------------- pinning
def test_the_pinned_folder_round_trips(vit_dir, registered, tmp_path):
    pin = read_pin(vit_dir)
    assert pin["model_id"] == f"open_clip:{TINY_VIT}/random-3" and pin["kind"] == "clip"
    assert pin["sha256"] == weights_sha256(vit_dir) == pin["revision"]
    assert pin["open_clip"]["model"] == TINY_VIT and pin["open_clip"]["pretrained"] == "random-3"
    assert pin["open_clip"]["tokenizer"] == {"class": "SimpleTokenizer", "context_length": 77}
    assert model_identity(vit_dir) == (pin["model_id"], pin["sha256"])
    config = json.loads((vit_dir / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["size"] == [32, 32] and config["model_cfg"]["embed_dim"] == 16

    # What open_clip builds from the name with the seed is what the folder loads.
    from pipeline.models.openclip import import_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        built = import_open_clip().create_model(TINY_VIT, pretrained=None).state_dict()
    loaded, _ = load_clip(vit_dir)
    got = loaded.model.state_dict()
    assert got.keys() == built.keys()
    assert all(torch.equal(got[k], built[k]) for k in built)

    # The same spec pins the same bytes; another seed, other weights.
    again = pin_open_clip_folder(tmp_path / "again", f"open_clip:{TINY_VIT}/random-3")
    other = pin_open_clip_folder(tmp_path / "other", f"open_clip:{TINY_VIT}/random-4")
    assert weights_sha256(again) == pin["sha256"] != weights_sha256(other)


def test_unknown_names_and_tags_and_damaged_folders_are_named(registered, vit_dir, tmp_path):
    with pytest.raises(ModelError, match="open_clip has no model 'RN50x5'.*close: RN50"):
        pin_open_clip_folder(tmp_path / "a", "open_clip:RN50x5/openai")
    with pytest.raises(ModelError, match="no pretrained tag 'laion' for RN50x4 .*tags: openai"):
        pin_open_clip_folder(tmp_path / "b", "open_clip:RN50x4/laion")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    broken = tmp_path / "broken"
    shutil.copytree(vit_dir, broken)
    config = json.loads((broken / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = 8
    (broken / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot load the open_clip model .*size mismatch"):
        load_clip(broken)


# -------------------------------------------------------------- preprocessing
@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("folder", ["vit_dir", "rn_dir"])
def test_preprocessing_is_open_clips_eval_transform(folder, request):
    from pipeline.embed.preprocess import Preprocessor

    model_dir = request.getfixturevalue(folder)
    _, transform = load_clip(model_dir)
    pre = Preprocessor.from_processor(transform, "processor")
    _, preprocess, _ = reference_open_clip(model_dir)
    for data in image_bytes():
        want = preprocess(Image.open(io.BytesIO(data)))
        got = pre.normalize(pre.to_uint8(data)[None])[0]
        assert got.shape == want.shape
        assert torch.equal(got, want)  # bit for bit


def test_fast_mode_decodes_large_jpegs_smaller_and_stays_close(vit_dir):
    from pipeline.embed.preprocess import Preprocessor

    _, transform = load_clip(vit_dir)
    exact, fast = Preprocessor.from_processor(transform, "processor"), Preprocessor.from_processor(transform, "fast")
    data = photo_jpeg(5, 400, 300)
    assert exact.decode(data).size == (400, 300) and max(fast.decode(data).size) <= 100
    a, b = (p.normalize(p.to_uint8(data)[None]) for p in (exact, fast))
    assert a.shape == b.shape == (1, 3, 32, 32)
    assert 0 < (a - b).abs().mean() < 0.05
    assert json.loads(fast.describe())["mode"] == "fast" != json.loads(exact.describe())["mode"]


# ---------------------------------------------------------------------- embed
def test_embed_writes_open_clips_vectors(vit_dir, tmp_path):
    from pipeline.core.params import ClipParams, DataParams
    from pipeline.core.runtime import Rank
    from pipeline.embed.shards import embed_shards
    from pipeline.formats.features import load_features, read_attrs
    from pipeline.formats.image_shards import iter_shard

    root = tmp_path / "images"
    make_image_dir(root, shards=2, per_shard=5, size=(53, 40))
    clip = ClipParams(model=f"open_clip:{TINY_VIT}/random-3", precision="fp32", batch_size=3, workers=2)
    summary = embed_shards(root, vit_dir, tmp_path / "f", clip, Rank(), DataParams(), progress=False)
    assert summary["images"] == 10 and summary["shards_written"] == 2
    table = load_features(tmp_path / "f")
    samples = {s.key: s.image for tar in sorted(root.glob("*.tar")) for s in iter_shard(tar)}
    want = reference_image_vectors(vit_dir, [samples[k] for k in table.keys])
    assert table.embeddings.shape == (10, 16)
    np.testing.assert_allclose(table.embeddings, want, rtol=0, atol=2e-6)

    attrs = read_attrs(tmp_path / "f" / "00000.h5")
    assert (attrs["model_id"], attrs["model_revision"]) == model_identity(vit_dir)
    assert json.loads(attrs["preprocess"])["library"] == "open_clip"
    assert "open_clip_torch" in json.loads(attrs["made_with"])["libraries"]
    again = embed_shards(root, vit_dir, tmp_path / "f", clip, Rank(), DataParams(), progress=False)
    assert again["shards_kept"] == 2 and again["shards_written"] == 0


# ------------------------------------------------------------------ CLIPScore
def test_clipscore_uses_both_open_clip_towers(rn_dir, tmp_path):
    from pipeline.evaluate.clipscore import PROMPT, ClipScorer, clipscore_unavailable
    from pipeline.formats.image_shards import iter_shard

    root = tmp_path / "images"
    make_image_dir(root, shards=1, per_shard=3, size=(70, 90))
    assert clipscore_unavailable(rn_dir, root) is None
    scorer = ClipScorer.load(rn_dir, torch.device("cpu"), batch_size=2)
    texts = ["a dog on a sofa", "two red cars parked by a wall " * 20, "x"]  # the long one is cut at 77 tokens
    got = scorer.texts(texts)
    model, _, tokenizer = reference_open_clip(rn_dir)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tokenizer([PROMPT + t for t in texts])), dim=-1)
    assert got.shape == (3, 24)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-6)

    samples = {s.key: s.image for s in iter_shard(root / "00000.tar")}
    images = scorer.images(root, sorted(samples))
    want_images = reference_image_vectors(rn_dir, [samples[k] for k in sorted(samples)])
    np.testing.assert_allclose(np.stack([images[k] for k in sorted(samples)]), want_images, rtol=0, atol=2e-6)


# -------------------------------------------------------------------- caption
def test_caption_embeds_images_as_open_clip_does(vit_dir, tiny_gpt_dir, tmp_path):
    from pipeline.caption.run import ImageEmbedder, caption_inputs
    from pipeline.core.params import Decoding, MapperParams
    from pipeline.embed.preprocess import Preprocessor
    from pipeline.models.captioner import ClipCaptioner
    from tests.helpers.models import fit_captions, load_tiny_gpt

    paths = []
    for i, data in enumerate(image_bytes()[:3]):
        paths.append(tmp_path / f"img{i}.jpg")
        paths[-1].write_bytes(data)
    vectors = torch.from_numpy(reference_image_vectors(vit_dir, [p.read_bytes() for p in paths]))
    model_id, revision = model_identity(vit_dir)
    _, transform = load_clip(vit_dir)
    features = {"model_id": model_id, "model_revision": revision, "output": "image_embeds", "dtype": "float32",
                "normalized": True, "preprocess": Preprocessor.from_processor(transform).describe(),
                "format_version": 1, "dim": 16}
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok,
                                        features=features, finetune_gpt=True)
    fit_captions(model, vectors, ["a red circle", "one blue square here", "a green triangle"], 120)
    model.save(tmp_path / "model", clip_dir=vit_dir)
    saved = ClipCaptioner.load(tmp_path / "model")  # its clip/ copy embeds the images
    embedder = ImageEmbedder(saved.clip_dir, saved.features, torch.device("cpu"))
    got = embedder([embedder.pre.to_uint8(p.read_bytes()) for p in paths])
    np.testing.assert_allclose(got.numpy(), vectors.numpy(), rtol=0, atol=2e-6)
    beam = Decoding(num_beams=2, max_new_tokens=6)
    results = caption_inputs(tmp_path / "model", [str(p) for p in paths], beam, precision="fp32", progress=False)
    assert [r.error for r in results] == [None] * 3
    assert [r.texts[0] for r in results] == ["a red circle", "one blue square here", "a green triangle"]

    from pipeline.export.onnx import export_onnx

    with pytest.raises(ModelError, match="its CLIP is an open_clip model; the export handles Hugging Face CLIPs only"):
        export_onnx(tmp_path / "model", tmp_path / "onnx")


# --------------------------------------------------------------- ClipCap import
def test_clipcaps_rn50x4_transformer_release_imports_with_an_rn50x4_folder(hub_gpt_dir, tmp_path):
    """RN50x4 at random weights (about 10 s): 640-wide image_embeds, as the release reads."""
    from pipeline.caption.run import caption_inputs
    from pipeline.core.params import Decoding
    from pipeline.imports.run import import_clipcap
    from pipeline.imports.weights import ImportFailed
    from tests.helpers.clipcap import CL, K, clipcap_transformer_state, save

    clip_dir = pin_open_clip_folder(tmp_path / "rn50x4", "open_clip:RN50x4/random")
    try:
        assert json.loads((clip_dir / "open_clip_config.json").read_text())["preprocess_cfg"]["size"] == 288
        state = clipcap_transformer_state(hub_gpt_dir, clip_dim=640)
        weights = save(tmp_path, state)
        model_dir = import_clipcap(weights, "transformer", K, CL, hub_gpt_dir, tmp_path / "m", clip_dir)
        captioner = json.loads((model_dir / "captioner.json").read_text())
        assert captioner["features"]["model_id"] == "open_clip:RN50x4/random"
        image = tmp_path / "a.jpg"
        image.write_bytes(photo_jpeg(0, 300, 200))
        (result,) = caption_inputs(model_dir, [str(image)], Decoding(max_new_tokens=3), progress=False)
        assert result.error is None and result.captions
        narrow = clipcap_transformer_state(hub_gpt_dir, clip_dim=16)
        with pytest.raises(ImportFailed, match="its image_embeds is 640 wide, the checkpoint's mapper reads 16"):
            import_clipcap(save(tmp_path, narrow), "transformer", K, CL, hub_gpt_dir, tmp_path / "m2", clip_dir)
    finally:
        shutil.rmtree(tmp_path / "rn50x4", ignore_errors=True)  # 700 MB of weights
