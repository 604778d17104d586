import json
import tarfile

import pytest

from pipeline.formats.image_shards import ImageShardError, iter_shard, list_shards
from tests.helpers.images import add_member, photo_jpeg, write_img2dataset_shard, write_our_shard


def test_our_shard_round_trip(tmp_path):
    imgs = {f"k{i}": photo_jpeg(i) for i in range(4)}
    write_our_shard(tmp_path / "00000.tar",
                    [(k, v, "test", [f"cap {k}", "<script>x</script>"]) for k, v in imgs.items()])
    samples = list(iter_shard(tmp_path / "00000.tar"))
    assert [s.key for s in samples] == sorted(imgs)
    for s in samples:
        assert s.image == imgs[s.key]
        assert s.ext == "jpg"
        assert s.meta["split"] == "test"
        assert s.meta["captions"] == [f"cap {s.key}", "<script>x</script>"]  # HTML kept as data


def test_img2dataset_shard_caption_and_txt(tmp_path):
    path = tmp_path / "00000.tar"
    write_img2dataset_shard(path, [("000000000", photo_jpeg(1), "a dog"), ("000000001", photo_jpeg(2), None)])
    # A third sample with only a .txt caption (no caption field in its json).
    with tarfile.open(path, "a") as tar:
        add_member(tar, "000000002.jpg", photo_jpeg(3))
        add_member(tar, "000000002.txt", b"  a cat on a mat \n")
        add_member(tar, "000000002.json", json.dumps({"key": "000000002"}).encode())
    samples = {s.key: s for s in iter_shard(path)}
    assert samples["000000000"].meta["captions"] == ["a dog"]
    assert samples["000000001"].meta["captions"] == []
    assert samples["000000002"].meta["captions"] == ["a cat on a mat"]
    assert "split" not in samples["000000000"].meta


def test_keys_keep_directories_and_group_by_first_dot(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "part/a1.seg.png", b"png-bytes")
        add_member(tar, "part/a1.json", b'{"captions": "one caption"}')
        add_member(tar, "part/b2.jpg", b"jpg-bytes")
    samples = list(iter_shard(path))
    assert [(s.key, s.ext, s.image) for s in samples] == [("part/a1", "", b""), ("part/b2", "jpg", b"jpg-bytes")]
    assert samples[0].meta["captions"] == ["one caption"]


def test_sample_without_image_is_kept(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.json", b'{"key": "a", "captions": ["c"]}')
    [s] = list(iter_shard(path))
    assert (s.key, s.image, s.ext, s.meta["captions"]) == ("a", b"", "", ["c"])


def test_list_shards_sorted_and_only_tars(tmp_path):
    for name in ("00002.tar", "00000.tar", "00001.tar", "00000.status.jsonl", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar", "00002.tar"]
    with pytest.raises(ImageShardError, match="missing"):
        list_shards(tmp_path / "missing")


def test_garbage_file_names_the_shard(tmp_path):
    path = tmp_path / "00007.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ImageShardError, match="00007.tar"):
        list(iter_shard(path))


def test_truncated_tar_streams_then_names_the_shard(tmp_path):
    path = tmp_path / "00003.tar"
    write_our_shard(path, [(f"k{i}", photo_jpeg(i, 200, 150), "train", []) for i in range(6)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(ImageShardError, match="00003.tar"):
        for s in iter_shard(path):
            got.append(s.key)
    # Streaming: the samples before the cut arrived before the error.
    assert got and got == [f"k{i}" for i in range(len(got))]


def test_metadata_naming_another_key_is_refused(tmp_path):
    path = tmp_path / "00004.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.jpg", b"x")
        add_member(tar, "a.json", b'{"key": "b"}')
    with pytest.raises(ImageShardError, match=r"00004.tar.*'a'.*'b'"):
        list(iter_shard(path))


def test_invalid_json_and_repeated_key(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        add_member(tar, "a.jpg", b"x")
        add_member(tar, "a.json", b"{not json")
    with pytest.raises(ImageShardError, match="a.json is not valid JSON"):
        list(iter_shard(bad))
    rep = tmp_path / "rep.tar"
    with tarfile.open(rep, "w") as tar:
        add_member(tar, "a.jpg", b"x")
        add_member(tar, "b.jpg", b"y")
        add_member(tar, "a.json", b"{}")
    with pytest.raises(ImageShardError, match="'a' appears twice"):
        list(iter_shard(rep))


def test_links_are_not_followed(tmp_path):
    path = tmp_path / "l.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("evil.jpg")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
        add_member(tar, "ok.jpg", b"fine")
    assert [(s.key, s.image) for s in iter_shard(path)] == [("ok", b"fine")]


@pytest.mark.parametrize("meta", [
    b'{"key": "deep", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"captions": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
])
def test_deeply_nested_metadata_names_shard_and_sample(tmp_path, meta):
    # json.loads recurses once per level: without a check this is a RecursionError.
    path = tmp_path / "00005.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "deep.jpg", photo_jpeg(0))
        add_member(tar, "deep.json", meta)
    with pytest.raises(ImageShardError, match=r"00005.tar: sample 'deep': deep.json is nested too deeply"):
        list(iter_shard(path))
