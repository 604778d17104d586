"""`capline caption`: image files embedded as the features were, captioned, errors per image."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.caption import CaptionInputError, CaptionOptions, ImageEmbedder, caption_images
from pipeline.models.captioner import ClipCaptioner
from pipeline.params import DemoClip, MapperParams
from stages.cli import capline
from tests.helpers_model import load_tiny_gpt, save_tiny_gpt, torch_threads

CLIP = DemoClip(hidden_size=32, layers=1, heads=2, patch_size=8, projection_dim=16, pretrain_steps=0,
                pretrain_text_steps=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def reference_vectors(clip_dir, paths):
    """CLIP's own processor and model, the plain way: what the features must equal."""
    from pipeline.models.pretrained import image_processor_class
    from transformers import CLIPVisionModelWithProjection

    processor = image_processor_class().from_pretrained(clip_dir)
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.models.pretrained import model_identity
    from pipeline.embed.preprocess import Preprocessor
    from pipeline.models.demo import build_demo_clip
    from pipeline.models.pretrained import image_processor_class

    root = tmp_path_factory.mktemp("caption")
    clip_dir = root / "clip"
    build_demo_clip(clip_dir, CLIP, 32)
    images = []
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 48), (32, 32), (64, 40), (50, 50)]):
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        p = root / f"img{i}.png"
        Image.fromarray(arr).save(p)
        images.append(p)
    model_id, revision = model_identity(clip_dir)
    pre = Preprocessor.from_processor(image_processor_class().from_pretrained(clip_dir), "processor")
    features = {"model_id": model_id, "model_revision": revision, "output": "image_embeds", "dtype": "float32",
                "normalized": True, "preprocess": pre.describe(), "format_version": 1, "dim": 16}
    gpt, tok = load_tiny_gpt(save_tiny_gpt(root / "gpt"))
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok,
                                        features=features,
                          finetune_gpt=True)
    # Teach it one caption per image, so that captions depend on the image.
    vectors = reference_vectors(clip_dir, images)
    rows = [model.encode_caption(c, 10) for c in ["a red circle", "one blue square here", "a green triangle",
                                                  "one yellow circle here"]]
    t = max(map(len, rows))
    ids = torch.tensor([r + [model.pad_token_id] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(vectors, ids, mask).backward()
        opt.step()
    model.eval()
    model.save(root / "model")
    return root, clip_dir, images


def test_images_are_embedded_as_the_reference_processor_does(setup):
    root, clip_dir, images = setup
    model = ClipCaptioner.load(root / "model")
    embedder = ImageEmbedder(clip_dir, model.features, torch.device("cpu"))
    got = embedder([embedder.pre.to_uint8(p.read_bytes()) for p in images])
    want = reference_vectors(clip_dir, images)
    assert got.shape == (4, 16)
    assert torch.allclose(got, want, atol=1e-5)


def test_caption_images_matches_the_model_on_reference_vectors(setup):
    root, clip_dir, images = setup
    model = ClipCaptioner.load(root / "model")
    opts = CaptionOptions(num_beams=3, max_new_tokens=8, batch_size=3)
    results = caption_images(root / "model", clip_dir, images, opts)
    want = model.caption(reference_vectors(clip_dir, images), **opts.generate_kwargs())
    assert [r.path for r in results] == [str(p) for p in images]
    assert [r.captions for r in results] == [[w] for w in want]
    assert len({w for w in want}) > 1


def test_several_sampled_captions_per_image_are_seeded(setup):
    root, clip_dir, images = setup
    opts = CaptionOptions(num_captions=3, temperature=1.5, top_p=1.0, max_new_tokens=6, seed=7)
    a = caption_images(root / "model", clip_dir, images[:2], opts)
    b = caption_images(root / "model", clip_dir, images[:2], opts)
    assert [len(r.captions) for r in a] == [3, 3]
    assert [r.captions for r in a] == [r.captions for r in b]
    assert len(set(a[0].captions + a[1].captions)) > 1


def test_bad_images_get_an_error_and_the_rest_are_captioned(setup, tmp_path):
    root, clip_dir, images = setup
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.jpg")
    truncated.write_bytes((tmp_path / "ok.jpg").read_bytes()[:100])
    html = tmp_path / "page.jpg"
    html.write_text("<html><script>alert(1)</script></html>")
    paths = [images[0], truncated, tmp_path / "missing.png", html, images[1]]
    results = caption_images(root / "model", clip_dir, paths, CaptionOptions(num_beams=2, max_new_tokens=5))
    assert [r.error is None for r in results] == [True, False, False, False, True]
    assert "missing.png" in results[2].path and results[2].error
    assert len(results[0].captions) == 1 and len(results[4].captions) == 1


def test_another_clip_folder_is_refused(setup, tmp_path):
    from pipeline.models.demo import build_demo_clip

    root, clip_dir, images = setup
    other = tmp_path / "clip2"
    build_demo_clip(other, CLIP.model_copy(update={"seed": 1}), 32)
    with pytest.raises(CaptionInputError, match="model_id|model_revision"):
        caption_images(root / "model", other, images[:1])


def test_caption_command(setup):
    root, clip_dir, images = setup
    runner = CliRunner()
    args = ["caption", "--model", str(root / "model"), "--clip", str(clip_dir), "--beams", "2",
            "--max-new-tokens", "6"]
    res = runner.invoke(capline, args + [str(p) for p in images[:2]])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images[:2]]
    res = runner.invoke(capline, args + ["--json", "--num-captions", "2", str(images[0]), str(root / "nope.png")])
    assert res.exit_code == 1
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows[0]["captions"]) == 2 and "error" in rows[1]
    res = runner.invoke(capline, ["caption", "--model", str(root / "nothing"), "--clip", str(clip_dir),
                                  str(images[0])])
    assert res.exit_code == 1 and "captioner.json" in res.stderr
    # A wrong --clip folder is a clean error naming it, not a traceback.
    res = runner.invoke(capline, ["caption", "--model", str(root / "model"), "--clip", str(root / "noclip"),
                                  str(images[0])])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and str(root / "noclip") in res.stderr
