import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, features

from pipeline.core.runtime import Rank
from pipeline.embed.shards import embed_shards
from pipeline.models.pretrained import ModelError, model_identity, weights_sha256
from pipeline.embed.preprocess import ImageDecodeError, Preprocessor
from pipeline.formats.features import load_features, read_feature_shard
from pipeline.formats.image_shards import ImageShardError, iter_shard
from pipeline.core.params import ClipParams, DataParams, ParamsError
from pipeline.formats.records import split_for
from tests.helpers.images import (add_member, make_image_dir, photo_jpeg, tiff_raising_type_error,
                                  write_img2dataset_shard)
from tests.helpers.models import copy_model, make_tiny_clip, reference_embeddings

PIN = {"model_id": "test/tiny-clip", "revision": "abc123", "sha256": "f" * 64, "kind": "clip"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tiny_clip_dir):
    """The shared tiny CLIP with a pin.json: a hub model as the models stage leaves it."""
    return copy_model(tiny_clip_dir, tmp_path_factory.mktemp("clip") / "clip", pin=PIN)


@pytest.fixture(scope="module")
def clip_24_crop_30(tmp_path_factory):
    """Resized to 24 and cropped to 30: a crop larger than the resized image."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip-24-30") / "c", image_size=24, crop=30)


@pytest.fixture(scope="module")
def clip_33_crop_24(tmp_path_factory):
    """Resized to 33 and cropped to 24: an odd number of pixels to crop away."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip-33-24") / "c", image_size=33, crop=24)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    keys = make_image_dir(root, shards=3, per_shard=5, corrupt=["img0006"])
    return root, keys


def clip_params(**kw):
    base = dict(precision="fp32", batch_size=4, workers=2)
    base.update(kw)
    return ClipParams(**base)


def all_images(root):
    out = {}
    for tar in sorted(root.glob("*.tar")):
        for s in iter_shard(tar):
            out[s.key] = s
    return out


def test_fp32_equals_reference_path(tmp_path, clip_dir, images):
    root, keys = images
    summary = embed_shards(root, clip_dir, tmp_path / "f", clip_params(), Rank(), DataParams(), progress=False)
    assert summary["images"] == 14 and summary["failed"] == 1 and summary["shards_written"] == 3
    assert summary["precision"] == "fp32"
    samples = all_images(root)
    table = load_features(tmp_path / "f", expect={"model_id": "test/tiny-clip", "model_revision": "abc123"})
    good = sorted(k for k in samples if k != "img0006")
    assert table.keys == good
    ref = reference_embeddings(clip_dir, [samples[k].image for k in good])
    assert np.abs(table.embeddings - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(table.embeddings, axis=1), 1.0, atol=1e-5)
    assert table.splits == [samples[k].meta["split"] for k in good]
    assert table.captions == [samples[k].meta["captions"] for k in good]
    attrs = read_feature_shard(tmp_path / "f" / "00000.h5").attrs
    assert attrs["output"] == "image_embeds" and attrs["normalized"] is True and attrs["dtype"] == "float32"
    assert json.loads(attrs["preprocess"])["mode"] == "processor"
    assert attrs["source"] == "00000.tar" and attrs["images"] == 5 and attrs["failed"] == 0


def test_corrupt_image_gets_a_status_record_not_a_vector(tmp_path, clip_dir, images):
    root, _ = images
    embed_shards(root, clip_dir, tmp_path / "f", clip_params(workers=0), Rank(), DataParams(), progress=False)
    shard1 = read_feature_shard(tmp_path / "f" / "00001.h5")
    assert "img0006" not in shard1.keys and len(shard1.keys) == 4
    assert np.all(np.linalg.norm(shard1.embeddings, axis=1) > 0.5)  # never a zero vector
    lines = (tmp_path / "f" / "00001.status.jsonl").read_text().splitlines()
    [rec] = [json.loads(line) for line in lines]
    assert rec["key"] == "img0006" and rec["status"] == "decode_error" and rec["reason"]
    assert (tmp_path / "f" / "00000.status.jsonl").read_text() == ""


def test_pooler_output_unnormalized(tmp_path, clip_dir, images):
    root, _ = images
    embed_shards(root, clip_dir, tmp_path / "f", clip_params(output="pooler_output", normalize=False, workers=1),
                 Rank(), DataParams(), progress=False)
    table = load_features(tmp_path / "f")
    samples = all_images(root)
    ref = reference_embeddings(clip_dir, [samples[k].image for k in table.keys], "pooler_output", False)
    assert table.embeddings.shape[1] == 32  # hidden size, not projection_dim
    assert np.abs(table.embeddings - ref).max() < 1e-5
    assert table.attrs["output"] == "pooler_output" and table.attrs["normalized"] is False


def test_img2dataset_shards_get_hash_splits(tmp_path, clip_dir):
    root = tmp_path / "img"
    root.mkdir()
    write_img2dataset_shard(root / "00000.tar", [(f"{i:09d}", photo_jpeg(i), f"cap {i}") for i in range(6)])
    data = DataParams(val_fraction=0.3, test_fraction=0.3)
    embed_shards(root, clip_dir, tmp_path / "f", clip_params(workers=0), Rank(), data, progress=False)
    table = load_features(tmp_path / "f")
    assert table.keys == [f"{i:09d}" for i in range(6)]
    assert table.splits == [split_for(k, 0.3, 0.3) for k in table.keys]
    assert table.captions == [[f"cap {i}"] for i in range(6)]


def test_resume_keeps_finished_shards_and_equals_uninterrupted(tmp_path, clip_dir, images):
    root, _ = images
    out = tmp_path / "f"
    first = embed_shards(root, clip_dir, out, clip_params(), Rank(), DataParams(), progress=False)
    full = {p.name: read_feature_shard(p) for p in sorted(out.glob("*.h5"))}
    stamp = {n: (out / n).stat().st_mtime_ns for n in full}
    # A kill while writing shard 1: its feature file is gone, a partial temp file is left.
    (out / "00001.h5").unlink()
    (out / "00001.h5.tmp").write_bytes(b"partial")
    (out / ".00000.status.jsonl.x1y2.tmp").write_text("partial")  # beside a finished shard
    again = embed_shards(root, clip_dir, out, clip_params(), Rank(), DataParams(), progress=False)
    assert first["shards_written"] == 3
    assert again["shards_kept"] == 2 and again["shards_written"] == 1 and again["images"] == 4
    assert (out / "00000.h5").stat().st_mtime_ns == stamp["00000.h5"]
    assert not (out / "00001.h5.tmp").exists() and not list(out.glob(".*.tmp"))
    for name, table in full.items():
        back = read_feature_shard(out / name)
        assert back.keys == table.keys
        np.testing.assert_array_equal(back.embeddings, table.embeddings)
    # A feature shard whose image shard is gone is removed, not read as current.
    (out / "00009.h5").write_bytes(b"old")
    (out / "00009.status.jsonl").write_text("")
    embed_shards(root, clip_dir, out, clip_params(), Rank(), DataParams(), progress=False)
    assert not (out / "00009.h5").exists() and not (out / "00009.status.jsonl").exists()
    # Other settings make other vectors: nothing is kept.
    other = embed_shards(root, clip_dir, out, clip_params(normalize=False), Rank(), DataParams(), progress=False)
    assert other["shards_kept"] == 0 and other["shards_written"] == 3


def _bytes_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_image_shard_changed_at_the_same_size_is_embedded_again(tmp_path, clip_dir, caplog):
    root = tmp_path / "img"
    make_image_dir(root, shards=3, per_shard=3)
    out = tmp_path / "f"
    embed_shards(root, clip_dir, out, clip_params(), Rank(), DataParams(), progress=False)
    # Another caption, same length: the tar keeps its size (all the old check looked at).
    tar = root / "00001.tar"
    data = tar.read_bytes()
    assert data.count(b"picture 4") == 1
    tar.write_bytes(data.replace(b"picture 4", b"picture X"))
    caplog.set_level("WARNING")
    again = embed_shards(root, clip_dir, out, clip_params(), Rank(), DataParams(), progress=False)
    assert (again["shards_kept"], again["shards_written"]) == (2, 1)
    assert "embed: remaking 00001.h5, made with other inputs: source_sha256:" in caplog.text
    assert ["a <b>photo</b> number 4", "picture X"] in read_feature_shard(out / "00001.h5").captions
    embed_shards(root, clip_dir, tmp_path / "fresh", clip_params(), Rank(), DataParams(), progress=False)
    assert _bytes_of(out) == _bytes_of(tmp_path / "fresh")  # byte for byte


def test_settings_that_change_vectors_remake_shards_and_workers_do_not(tmp_path, clip_dir, images, caplog):
    root, _ = images
    out = tmp_path / "f"
    embed_shards(root, clip_dir, out, clip_params(workers=2), Rank(), DataParams(), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.set_level("WARNING")
    same = embed_shards(root, clip_dir, out, clip_params(workers=0), Rank(), DataParams(), progress=False)
    assert same["shards_kept"] == 3 and same["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert "remaking" not in caplog.text
    # The batch size fixes which images share a model call, hence the last bits.
    other = embed_shards(root, clip_dir, out, clip_params(batch_size=2), Rank(), DataParams(), progress=False)
    assert other["shards_kept"] == 0 and other["shards_written"] == 3
    assert "embed: remaking 00000.h5, made with other inputs: made_with.batch_size: 4 there, 2 here" in caplog.text
    embed_shards(root, clip_dir, out, clip_params(batch_size=2, normalize=False), Rank(), DataParams(), progress=False)
    assert "embed: remaking 00000.h5, made with other inputs: normalized: True there, False here" in caplog.text
    embed_shards(root, clip_dir, tmp_path / "fresh", clip_params(batch_size=2, normalize=False), Rank(), DataParams(),
                 progress=False)
    assert _bytes_of(out) == _bytes_of(tmp_path / "fresh")


def test_files_of_feature_shards_without_an_image_shard_are_removed(tmp_path, clip_dir, images):
    root, _ = images
    out = tmp_path / "f"
    out.mkdir()
    for name in ("00009.h5", "00009.status.jsonl", "00008.status.jsonl", "00008.h5.tmp",
                 ".00007.status.jsonl.x1y2.tmp"):
        (out / name).write_bytes(b"left over")
    embed_shards(root, clip_dir, out, clip_params(), Rank(), DataParams(), progress=False)
    embed_shards(root, clip_dir, tmp_path / "fresh", clip_params(), Rank(), DataParams(), progress=False)
    assert _bytes_of(out) == _bytes_of(tmp_path / "fresh")


def test_feature_shards_of_an_unfinished_run_come_back_after_the_output_folder_was_reverted(tmp_path, clip_dir,
                                                                                          caplog):
    """`dvc exp run` checks out the last recorded output before it reruns a stage;
    shards an unfinished run had finished come back from data/features.partial."""
    root = tmp_path / "img"
    make_image_dir(root, shards=3, per_shard=3)
    recorded = tmp_path / "recorded"  # what dvc.lock records: normalized vectors
    embed_shards(root, clip_dir, recorded, clip_params(workers=0), Rank(), DataParams(), progress=False)
    assert not (tmp_path / "recorded.partial").exists()  # a finished run keeps nothing aside
    # The experiment (normalize: false) stops at a damaged shard 2, after shards 0 and 1.
    good = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(good[:1500])
    out = tmp_path / "f"
    with pytest.raises(ImageShardError, match="00002.tar"):
        embed_shards(root, clip_dir, out, clip_params(workers=0, normalize=False), Rank(), DataParams(),
                     progress=False)
    partial = tmp_path / "f.partial"
    assert sorted(p.name.split("@")[0] for p in partial.glob("*.h5")) == ["00000", "00001"]
    # The recorded output is checked out over them; the shard is mended; the experiment reruns.
    shutil.rmtree(out)
    shutil.copytree(recorded, out)
    (root / "00002.tar").write_bytes(good)
    caplog.set_level("WARNING")
    again = embed_shards(root, clip_dir, out, clip_params(workers=0, normalize=False), Rank(), DataParams(),
                         progress=False)
    assert (again["shards_kept"], again["shards_written"]) == (2, 1)
    assert f"embed: put back 2 feature shards finished by a run that did not complete (from {partial})" in caplog.text
    assert "embed: remaking 00002.h5, made with other inputs: normalized: True there, False here" in caplog.text
    assert not partial.exists()
    embed_shards(root, clip_dir, tmp_path / "fresh", clip_params(workers=0, normalize=False), Rank(), DataParams(),
                 progress=False)
    assert _bytes_of(out) == _bytes_of(tmp_path / "fresh")


def test_corrupt_shard_stops_with_its_name_and_keeps_earlier_work(tmp_path, clip_dir):
    root = tmp_path / "img"
    make_image_dir(root, shards=3, per_shard=3)
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[:1500])
    with pytest.raises(ImageShardError, match="00001.tar"):
        embed_shards(root, clip_dir, tmp_path / "f", clip_params(workers=0), Rank(), DataParams(), progress=False)
    assert (tmp_path / "f" / "00000.h5").exists() and not (tmp_path / "f" / "00001.h5").exists()


def test_ranks_split_shards_and_union_equals_single_process(tmp_path, clip_dir, images):
    root, _ = images
    single = tmp_path / "single"
    embed_shards(root, clip_dir, single, clip_params(workers=0), Rank(), DataParams(), progress=False)
    split = tmp_path / "split"
    s0 = embed_shards(root, clip_dir, split, clip_params(workers=1), Rank(0, 2), DataParams(), progress=False)
    assert sorted(p.name for p in split.glob("*.h5")) == ["00000.h5", "00002.h5"]
    s1 = embed_shards(root, clip_dir, split, clip_params(workers=1), Rank(1, 2), DataParams(), progress=False)
    assert (s0["shards_written"], s1["shards_written"]) == (2, 1)
    a, b = load_features(single), load_features(split)
    assert a.keys == b.keys and a.splits == b.splits
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)


def test_model_identity_without_pin(tmp_path, images, tiny_clip_dir):
    folder = copy_model(tiny_clip_dir, tmp_path / "my-clip")
    assert model_identity(folder) == ("my-clip", weights_sha256(folder))
    with pytest.raises(ModelError, match="nothing: no config.json"):
        embed_shards(images[0], tmp_path / "nothing", tmp_path / "f", clip_params(), Rank(), DataParams())
    with pytest.raises(ImageShardError, match="no image shards"):
        embed_shards(tmp_path, folder, tmp_path / "f", clip_params(), Rank(), DataParams())


def test_bf16_run(tmp_path, clip_dir, images):
    root, _ = images
    summary = embed_shards(root, clip_dir, tmp_path / "f", clip_params(precision="bf16", workers=0), Rank(),
                           DataParams(), progress=False)
    table = load_features(tmp_path / "f")
    assert summary["dtype"] == table.attrs["dtype"] == "bfloat16"
    assert table.embeddings.dtype == np.float32


def _processor_pixels(folder, image):
    from pipeline.models.pretrained import image_processor_class

    return image_processor_class().from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("mode,size", [("RGB", (50, 80)), ("L", (70, 40)), ("RGBA", (40, 40)), ("P", (33, 90))])
def test_preprocess_matches_processor_on_odd_images(clip_24_crop_30, mode, size):
    # Crop larger than the resized image: exercises HF's zero padding too.
    folder = clip_24_crop_30
    from pipeline.models.pretrained import image_processor_class

    pre = Preprocessor.from_processor(image_processor_class().from_pretrained(folder))
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA").convert(mode)
    if mode == "P":
        im.info["transparency"] = 3
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    ours = pre.normalize(pre.to_uint8(buf.getvalue())[None])[0]
    ref = _processor_pixels(folder, Image.open(io.BytesIO(buf.getvalue())))
    assert ours.shape == ref.shape == (3, 30, 30)
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("size", [(50, 71), (71, 50), (47, 47)])
def test_center_crop_matches_processor_when_the_excess_is_odd(clip_33_crop_24, size):
    # Resized to a shorter side of 33 and cropped to 24: 9 (odd) pixels to drop on an
    # axis, where an off-by-one crop would shift the image by a pixel.
    folder = clip_33_crop_24
    from pipeline.models.pretrained import image_processor_class

    pre = Preprocessor.from_processor(image_processor_class().from_pretrained(folder))
    arr = np.random.default_rng(2).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    ours = pre.normalize(pre.to_uint8(buf.getvalue())[None])[0]
    ref = _processor_pixels(folder, Image.open(io.BytesIO(buf.getvalue())))
    assert ours.shape == ref.shape == (3, 24, 24)
    assert (ours - ref).abs().max() < 1e-5


def test_fast_mode_close_to_processor_and_limits(tiny_clip_dir):
    folder = tiny_clip_dir  # image_size 32
    from pipeline.models.pretrained import image_processor_class

    proc = image_processor_class().from_pretrained(folder)
    exact, fast = Preprocessor.from_processor(proc), Preprocessor.from_processor(proc, "fast")
    data = photo_jpeg(3, 640, 480)
    a = exact.normalize(exact.to_uint8(data)[None])
    b = fast.normalize(fast.to_uint8(data)[None])
    assert a.shape == b.shape
    diff = (a - b).abs().mean().item()
    assert 0 < diff < 0.05  # draft decoding is different, but only slightly
    assert json.loads(fast.describe())["mode"] == "fast"
    small = Preprocessor.from_processor(proc, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        small.to_uint8(data)
    with pytest.raises(ImageDecodeError):
        exact.to_uint8(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ParamsError, match="clip.preprocess"):
        Preprocessor.from_processor(proc, "magic")


def test_bf16_agrees_with_fp32_on_real_size_vit_b32():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from pipeline.models.pretrained import image_processor_class

    from pipeline.embed.encoder import Encoder

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).eval()
    pre = Preprocessor.from_processor(image_processor_class()())
    pixels = torch.stack([pre.to_uint8(photo_jpeg(i, 640, 480)) for i in range(4)])
    x = pre.normalize(pixels)
    fp32 = Encoder.build(model, torch.device("cpu"), "fp32", "image_embeds", True)(x)
    bf16 = Encoder.build(model, torch.device("cpu"), "bf16", "image_embeds", True)(x)
    cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1)
    assert fp32.shape == (4, 512)
    assert cos.min().item() >= 0.999


def test_any_decode_exception_is_the_images_status_line(tmp_path, clip_dir):
    from pipeline.models.pretrained import image_processor_class

    odd = tiff_raising_type_error()
    pre = Preprocessor.from_processor(image_processor_class().from_pretrained(clip_dir))
    with pytest.raises(ImageDecodeError, match="TypeError"):
        pre.to_uint8(odd)
    root = tmp_path / "images"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, member, data in (("a", "a.jpg", photo_jpeg(1)), ("b", "b.tif", odd), ("c", "c.jpg", photo_jpeg(2))):
            add_member(tar, member, data)
            add_member(tar, f"{key}.json", json.dumps({"key": key, "split": "train", "captions": [key]}).encode())
    summary = embed_shards(root, clip_dir, tmp_path / "f", clip_params(workers=0), Rank(), DataParams(),
                           progress=False)
    assert summary["images"] == 2 and summary["failed"] == 1
    assert read_feature_shard(tmp_path / "f" / "00000.h5").keys == ["a", "c"]
    [rec] = [json.loads(line) for line in (tmp_path / "f" / "00000.status.jsonl").read_text().splitlines()]
    assert rec["key"] == "b" and rec["status"] == "decode_error" and "TypeError" in rec["reason"]


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow decodes no AVIF")
def test_avif_member_is_embedded(tmp_path, clip_dir):
    # img2dataset-style shards may hold other formats than JPEG; AVIF is read like the rest.
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(4))).save(buf, "AVIF", quality=90)
    root = tmp_path / "images"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, member, data in (("a", "a.jpg", photo_jpeg(1)), ("b", "b.avif", buf.getvalue())):
            add_member(tar, member, data)
            add_member(tar, f"{key}.json", json.dumps({"key": key, "split": "train", "captions": [key]}).encode())
    summary = embed_shards(root, clip_dir, tmp_path / "f", clip_params(workers=0), Rank(), DataParams(),
                           progress=False)
    assert summary["images"] == 2 and summary["failed"] == 0
    assert read_feature_shard(tmp_path / "f" / "00000.h5").keys == ["a", "b"]
