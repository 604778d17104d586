"""`capline caption`: files, folders, URLs (a real loopback server) and tar shards, embedded as the
features were, captioned with the model folder's own CLIP and decoding defaults, errors per input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.caption.run import CaptionInputError, ImageEmbedder, caption_inputs, resolve_decoding
from pipeline.text.decoding import decode_batch, prepare_for_inference
from pipeline.core.params import Decoding
from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import MapperParams
from stages.cli import capline
from tests.helpers.loopback import Reply
from tests.helpers.models import TINY_CLIP, clip_feature_attrs, copy_model, fit_captions, load_tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
def setup(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    root = tmp_path_factory.mktemp("caption")
    clip_dir = copy_model(hub_clip_dir, root / "clip")  # a copy: a test hides it by renaming it
    images = []
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 48), (32, 32), (64, 40), (50, 50)]):
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        p = root / f"img{i}.png"
        Image.fromarray(arr).save(p)
        images.append(p)
    features = clip_feature_attrs(clip_dir, 16)
    gpt, tok = load_tiny_gpt(tiny_gpt_dir)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=2).model_dump(), 16, gpt, tok,
                                        features=features, finetune_gpt=True)
    # Teach it one caption per image, so that captions depend on the image.
    fit_captions(model, reference_vectors(clip_dir, images),
                 ["a red circle", "one blue square here", "a green triangle", "one yellow circle here"], 60)
    model.save(root / "model", clip_dir=clip_dir)
    return root, clip_dir, images


BEAM = Decoding(num_beams=3, max_new_tokens=8)


def test_images_are_embedded_as_the_reference_processor_does(setup):
    root, clip_dir, images = setup
    model = ClipCaptioner.load(root / "model")
    embedder = ImageEmbedder(clip_dir, model.features, torch.device("cpu"))
    got = embedder([embedder.pre.to_uint8(p.read_bytes()) for p in images])
    want = reference_vectors(clip_dir, images)
    assert got.shape == (4, 16)
    assert torch.allclose(got, want, atol=1e-5)


def test_captions_are_the_models_on_reference_vectors(setup):
    root, clip_dir, images = setup
    model = prepare_for_inference(ClipCaptioner.load(root / "model"), torch.device("cpu"), "fp32")
    results = caption_inputs(root / "model", [str(p) for p in images], BEAM, precision="fp32", batch_size=3,
                             progress=False)
    want = decode_batch(model, reference_vectors(clip_dir, images), BEAM, [str(p) for p in images])
    assert [r.name for r in results] == [str(p) for p in images]
    assert [r.captions for r in results] == want
    assert len({caps[0].text for caps in want}) > 1


def test_the_model_folder_alone_is_enough(setup, tmp_path):
    """Moved elsewhere, with the CLIP folder it was trained from gone, the folder still captions."""
    import shutil

    root, clip_dir, images = setup
    before = caption_inputs(root / "model", [str(images[0])], progress=False)
    moved = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(root / "model", moved)
    hidden = clip_dir.with_name("clip-hidden")
    clip_dir.rename(hidden)
    try:
        after = caption_inputs(moved, [str(images[0])], progress=False)  # decoding: the folder's defaults
    finally:
        hidden.rename(clip_dir)
    assert json.loads((moved / "captioner.json").read_text())["clip"]["dir"] == "clip"
    from pipeline.models.pretrained import model_identity

    assert model_identity(moved / "clip") == model_identity(clip_dir)
    saved = json.loads((moved / "generation_config.json").read_text())
    assert saved["num_beams"] == Decoding().num_beams and saved["eos_token_id"] is not None
    assert after[0].error is None and after[0].captions == before[0].captions


def test_options_override_the_saved_defaults(setup):
    root, _, _ = setup
    saved = resolve_decoding(root / "model", {})
    # The schema defaults, the length cut to GPT-2's room (64 positions, prefix of 2).
    assert saved == Decoding(max_new_tokens=min(Decoding().max_new_tokens, 64 - 2))
    d = resolve_decoding(root / "model", {"num_beams": 2, "top_k": None})
    assert d.num_beams == 2 and d.max_new_tokens == saved.max_new_tokens
    from pipeline.core.errors import ParamsError
    from pipeline.caption.run import option_name

    with pytest.raises(ParamsError, match="--num-return-sequences.*--num-beams"):
        resolve_decoding(root / "model", {"num_return_sequences": 4, "num_beams": 2}, option_name)


def test_sampled_captions_are_seeded_per_image(setup):
    root, clip_dir, images = setup
    paths = [str(p) for p in images]
    d = Decoding(num_beams=1, do_sample=True, temperature=1.5, num_return_sequences=3, max_new_tokens=6, seed=7)
    a = caption_inputs(root / "model", paths, d, batch_size=4, progress=False)
    b = caption_inputs(root / "model", paths, d, batch_size=1, progress=False)
    c = caption_inputs(root / "model", paths[::-1], d, batch_size=3, progress=False)
    other = caption_inputs(root / "model", paths, d.model_copy(update={"seed": 8}), batch_size=4, progress=False)
    assert [len(r.captions) for r in a] == [3, 3, 3, 3]
    # The same seed gives the same captions, whatever the batch size or the order of the inputs.
    assert [r.texts for r in a] == [r.texts for r in b] == [r.texts for r in c[::-1]]
    scores = lambda rs: [c.score for r in rs for c in r.captions]  # noqa: E731
    assert scores(a) == pytest.approx(scores(b), abs=1e-3) and scores(a) == pytest.approx(scores(c[::-1]), abs=1e-3)
    assert [r.texts for r in a] != [r.texts for r in other]
    assert len({t for r in a for t in r.texts}) > 4
    for r in a:  # best first
        scores = [c.score for c in r.captions]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)


def test_bad_inputs_get_an_error_and_the_rest_are_captioned(setup, tmp_path):
    root, clip_dir, images = setup
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.jpg")
    truncated.write_bytes((tmp_path / "ok.jpg").read_bytes()[:100])
    html = tmp_path / "page.jpg"
    html.write_text("<html><script>alert(1)</script></html>")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    paths = [images[0], truncated, tmp_path / "missing.png", html, tmp_path / "empty", images[1]]
    results = caption_inputs(root / "model", [str(p) for p in paths], BEAM, progress=False)
    assert [r.error is None for r in results] == [True, False, False, False, False, True]
    assert "not found" in results[2].error and "cannot decode" in results[1].error
    assert "without image files" in results[4].error
    assert len(results[0].captions) == 1 and len(results[5].captions) == 1


def test_another_clip_folder_is_refused(setup, tmp_path):
    from pipeline.pin.demo import build_demo_clip

    root, clip_dir, images = setup
    other = tmp_path / "clip2"
    build_demo_clip(other, TINY_CLIP.model_copy(update={"seed": 1}), 32)
    with pytest.raises(CaptionInputError, match="model_id|model_revision"):
        caption_inputs(root / "model", [str(images[0])], clip_dir=other, progress=False)


def _shard(path, samples):
    """A webdataset tar: KEY.png + KEY.json per sample (ours), or KEY.jpg + KEY.txt (img2dataset's)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_caption_command_takes_a_folder_a_url_and_a_shard(setup, tmp_path, loopback):
    """One call: a folder (recursive), a loopback URL, a shard, and a 404 reported while the rest is captioned."""
    root, clip_dir, images = setup
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.png").write_bytes(images[1].read_bytes())
    (folder / "sub" / "a.png").write_bytes(images[0].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    shard = _shard(tmp_path / "00000.tar", [
        ("k1.png", images[2].read_bytes()), ("k1.json", b'{"key": "k1", "captions": ["x"]}'),
        ("k2.jpg", b"broken"), ("k2.txt", b"a caption"),
    ])
    url = loopback.route("/img.png", Reply(body=images[3].read_bytes(), content_type="image/png"))
    missing = loopback.url("/gone.png")
    args = ["caption", "--model", str(root / "model"), "--num-beams", "2", "--max-new-tokens", "6",
            "--no-progress", str(folder), url, str(shard), missing]
    res = CliRunner().invoke(capline, args + ["--out", str(tmp_path / "out.jsonl")])
    coco = CliRunner().invoke(capline, args + ["--format", "coco"])
    tsv = CliRunner().invoke(capline, args)
    assert res.exit_code == 1, res.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    names = [r["input"] for r in rows]
    assert names == [str(folder / "b.png"), str(folder / "sub" / "a.png"), url, f"{shard}#k1", f"{shard}#k2",
                     missing]
    ok = {r["input"]: r for r in rows if "error" not in r}
    assert set(ok) == set(names[:4]) and all(len(r["captions"]) == 1 for r in ok.values())
    assert ok[f"{shard}#k1"]["image_id"] == "k1"
    assert "HTTP 404" in rows[-1]["error"] and "cannot decode" in rows[-2]["error"]
    assert f"{missing}\terror: http_error: HTTP 404" in res.stderr
    # The same image as a file, from the folder, from the server or from a shard gets the same caption.
    by_image = {r["input"]: r["captions"][0]["caption"] for r in ok.values()}
    direct = caption_inputs(root / "model", [str(p) for p in images], Decoding(num_beams=2, max_new_tokens=6),
                            progress=False)
    assert by_image[str(folder / "sub" / "a.png")] == direct[0].texts[0]
    assert by_image[url] == direct[3].texts[0] and by_image[f"{shard}#k1"] == direct[2].texts[0]
    assert coco.exit_code == 1
    assert [r["image_id"] for r in json.loads(coco.stdout)] == [str(folder / "b.png"), str(folder / "sub" / "a.png"),
                                                                 url, "k1"]
    assert [line.split("\t")[0] for line in tsv.stdout.splitlines()] == names[:4]


def test_caption_command_errors(setup, tmp_path):
    root, clip_dir, images = setup
    runner = CliRunner()
    res = runner.invoke(capline, ["caption", "--model", str(root / "nothing"), str(images[0])])
    assert res.exit_code == 1 and "captioner.json" in res.stderr
    # A wrong --clip folder is a clean error naming it, not a traceback.
    res = runner.invoke(capline, ["caption", "--model", str(root / "model"), "--clip", str(root / "noclip"),
                                  str(images[0])])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and str(root / "noclip") in res.stderr
    res = runner.invoke(capline, ["caption", "--model", str(root / "model"), "--temperature", "0.5", str(images[0])])
    assert res.exit_code == 1 and "--temperature" in res.stderr and "--do-sample" in res.stderr
    res = runner.invoke(capline, ["caption", "--model", str(root / "model"), "--num-beams", "2",
                                  "--num-return-sequences", "3", str(images[0])])
    assert res.exit_code == 1 and "--num-return-sequences" in res.stderr and "--num-beams" in res.stderr


def test_caption_command_prints_no_library_loading_bars(setup):
    """transformers' "Loading weights" bars do not reach the user's terminal; the caption does."""
    root, clip_dir, images = setup
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "caption", "--model", str(root / "model"),
                           "--device", "cpu", str(images[0])],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{images[0]}\t")
    assert "Loading weights" not in proc.stderr, proc.stderr
