"""Dataset spec readers, prepare (fetch, zip, checksum, cache) and their errors."""
from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from pipeline.prepare.manifest import read_manifest
from pipeline.prepare.source import iter_records
from pipeline.prepare.errors import DatasetError
from pipeline.prepare.run import prepare
from pipeline.prepare.readers import read_coco, read_jsonl, read_karpathy, read_table
from pipeline.core.params import DataParams
from pipeline.formats.records import split_for
from tests.helpers.datasets import coco_fixture
from tests.helpers.loopback import Reply


def test_coco_with_karpathy_split(tmp_path):
    coco, karpathy = coco_fixture("http://h")
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    recs = list(read_coco(tmp_path / "c.json", tmp_path / "k.json", None, 0.1, 0.1))
    assert [(r.key, r.split, r.url) for r in recs] == [
        ("000000000042", "test", "http://h/42.jpg"), ("000000000007", "train", "http://h/7.jpg"),
        ("000000001000", "val", "http://h/1000.jpg")]
    assert recs[0].captions == ("caption 0 of 42", "caption 2 of 42")  # all captions of one image, whitespace tidied


def test_coco_without_split_file_hashes_per_image(tmp_path):
    coco, _ = coco_fixture("http://h")
    (tmp_path / "c.json").write_text(json.dumps(coco))
    recs = list(read_coco(tmp_path / "c.json", None, "http://mirror/val2014/", 0.3, 0.3))
    assert [r.split for r in recs] == [split_for(r.key, 0.3, 0.3) for r in recs]
    assert recs[0].url == "http://mirror/val2014/COCO_val2014_000000000042.jpg"  # image_root wins over coco_url


def test_karpathy_alone_with_local_folder(tmp_path):
    _, karpathy = coco_fixture("")
    karpathy["images"][0].pop("cocoid")
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    recs = list(read_karpathy(tmp_path / "k.json", (tmp_path / "imgs").as_uri()))
    assert recs[0].key == "COCO_val2014_000000000042" and recs[1].key == "000000000007"
    assert recs[0].url == (tmp_path / "imgs" / "val2014" / "COCO_val2014_000000000042.jpg").as_uri()
    assert [r.split for r in recs] == ["test", "train", "val"]
    with pytest.raises(DatasetError, match="data.image_root"):
        list(read_karpathy(tmp_path / "k.json", None))


def test_cc3m_tsv_without_header(tmp_path):
    (tmp_path / "cc.tsv").write_text('a "quoted" dog\thttp://x/1.jpg\n<b>bold</b> cat\thttps://x/2.jpg?a=1\n')
    recs = list(read_table(tmp_path / "cc.tsv", "\t", 0.2, 0.2))
    assert [(r.key, r.url, r.captions) for r in recs] == [
        ("000000000", "http://x/1.jpg", ('a "quoted" dog',)), ("000000001", "https://x/2.jpg?a=1", ("<b>bold</b> cat",))]
    assert [r.split for r in recs] == [split_for(r.url, 0.2, 0.2) for r in recs]


def test_csv_with_header_sha_and_keys(tmp_path):
    sha = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "l.csv").write_text(f'key,url,caption,sha256\nk-1,http://x/1.jpg,"a, b",{sha}\nk-2,http://x/2.jpg,c,\n')
    recs = list(read_table(tmp_path / "l.csv", ",", 0.0, 0.0))
    assert [(r.key, r.captions, r.sha256) for r in recs] == [("k-1", ("a, b",), sha), ("k-2", ("c",), None)]


def test_jsonl_captions_list(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"url": "file:a.png", "captions": ["one", "two"]}\n\n{"image_url": "http://x/b", "caption": "three"}\n')
    recs = list(read_jsonl(tmp_path / "l.jsonl", 0.1, 0.1))
    assert [(r.key, r.url, r.captions) for r in recs] == [("000000000", "file:a.png", ("one", "two")),
                                                         ("000000001", "http://x/b", ("three",))]


@pytest.mark.parametrize("name,text,line,message", [
    ("bad.csv", "url,caption,color\nhttp://x,a,red\n", 1, "unknown column 'color'"),
    ("bad.tsv", "a\thttp://x/1\nb\thttp://x/2\textra\n", 2, "expected 2 fields"),
    ("bad.csv", "caption,url\na,\n", 2, "empty or missing url"),
    ("bad.jsonl", '{"url": "http://x", "caption": "a"}\n{"url": "http://y", "caption": \n', 2, "not valid JSON"),
    ("bad.jsonl", '{"url": "http://x", "caption": "a", "rating": 5}\n', 1, "unknown field"),
    ("bad.jsonl", '{"url": "http://x", "caption": "a", "sha256": "abc"}\n', 1, "sha256"),
    ("bad.jsonl", '{"url": "http://x", "key": "a/b"}\n', 1, "key 'a/b'"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, text, line, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError) as err:
        if name.endswith(".jsonl"):
            list(read_jsonl(path, 0.1, 0.1))
        else:
            list(read_table(path, "\t" if name.endswith(".tsv") else ",", 0.1, 0.1))
    assert f"{path}:{line}:" in str(err.value) and message in str(err.value)


def test_prepare_local_list_records_sha_and_caps(tmp_path):
    lines = "".join(f"caption {i}\thttp://x/{i}.jpg\n" for i in range(10))
    (tmp_path / "l.tsv").write_text(lines)
    m = prepare(tmp_path / "src", DataParams(source="tsv", annotations=str(tmp_path / "l.tsv"), max_records=4))
    assert m.records == 4 and m.sha256["annotations"] == hashlib.sha256(lines.encode()).hexdigest()
    assert read_manifest(tmp_path / "src") == m
    assert [r.key for r in iter_records(tmp_path / "src")] == ["000000000", "000000001", "000000002", "000000003"]


def test_prepare_stops_on_a_bad_spec_and_keeps_the_old_output(tmp_path):
    (tmp_path / "ok.tsv").write_text("a\thttp://x/1.jpg\n")
    prepare(tmp_path / "src", DataParams(source="tsv", annotations=str(tmp_path / "ok.tsv")))
    (tmp_path / "bad.tsv").write_text("a\thttp://x/1.jpg\nbroken line\n")
    with pytest.raises(DatasetError, match=r"bad.tsv:2"):
        prepare(tmp_path / "src", DataParams(source="tsv", annotations=str(tmp_path / "bad.tsv")))
    assert read_manifest(tmp_path / "src").records == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_prepare_duplicate_keys_refused(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"url": "http://x/1", "key": "a"}\n{"url": "http://x/2", "key": "a"}\n')
    with pytest.raises(DatasetError, match="'a' appears twice"):
        prepare(tmp_path / "src", DataParams(source="jsonl", annotations=str(tmp_path / "l.jsonl")))


def test_prepare_fetches_zip_members_over_http_once(tmp_path, loopback):
    coco, karpathy = coco_fixture("http://h")
    buf = tmp_path / "ann.zip"
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("annotations/captions_val2014.json", json.dumps(coco))
        zf.writestr("annotations/instances_val2014.json", "{}")
    single = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(single, "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps(karpathy))
    ann_url = loopback.route("/ann.zip", Reply(200, buf.read_bytes(), content_type="application/zip"))
    split_url = loopback.route("/caption_datasets.zip", Reply(200, single.read_bytes()))
    params = DataParams(source="coco", annotations=ann_url + "#captions_val2014.json", karpathy_split=split_url)
    for _ in range(2):
        m = prepare(tmp_path / "src", params, cache_dir=tmp_path / "cache")
    assert loopback.hits["/ann.zip"] == 1 and loopback.hits["/caption_datasets.zip"] == 1  # cached
    with pytest.raises(DatasetError, match="2 data files"):
        prepare(tmp_path / "src2", DataParams(source="coco", annotations=ann_url), cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="HTTP 404"):
        prepare(tmp_path / "src2", DataParams(source="coco", annotations=loopback.url("/nope.json")),
                cache_dir=tmp_path / "cache")
    assert m.files == {"annotations": "captions_val2014.json", "karpathy_split": "dataset_coco.json"}
    assert m.sha256["annotations"] == hashlib.sha256(json.dumps(coco).encode()).hexdigest()
    assert m.origin["annotations"].endswith("/ann.zip#captions_val2014.json")
    assert [r.split for r in iter_records(tmp_path / "src")] == ["test", "train", "val"]


def test_keys_are_a_pure_function_of_the_input(tmp_path):
    coco, karpathy = coco_fixture("http://h")
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    params = DataParams(source="coco", annotations=str(tmp_path / "c.json"), karpathy_split=str(tmp_path / "k.json"))
    a = list(iter_records(prepare(tmp_path / "a", params) and tmp_path / "a"))
    b = list(iter_records(prepare(tmp_path / "b", params) and tmp_path / "b"))
    assert a == b and len({r.key for r in a}) == 3


def test_prepare_follows_redirects_and_caches_the_target(tmp_path, loopback):
    # A redirect must be followed, not cached as an (empty) annotation file.
    coco, _ = coco_fixture("http://h")
    body = json.dumps(coco).encode()
    target = loopback.route("/real/captions.json", Reply(200, body, content_type="application/json"))
    url = loopback.route("/captions.json", Reply(302, b"", headers={"Location": target}))
    loop = loopback.route("/loop.json", Reply(302, b"", headers={"Location": "/loop.json"}))
    m = prepare(tmp_path / "src", DataParams(source="coco", annotations=url), cache_dir=tmp_path / "cache")
    assert m.sha256["annotations"] == hashlib.sha256(body).hexdigest() and m.records == 3
    with pytest.raises(DatasetError, match="redirects"):
        prepare(tmp_path / "src2", DataParams(source="coco", annotations=loop), cache_dir=tmp_path / "cache")
    assert loopback.hits["/loop.json"] == 6  # 5 redirects followed, then a final failure (no retries)


def test_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"url": "http://x/1", "caption": "a"}\n{"url": "http://x/2", "caption": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=f"{path}:2: not UTF-8"):
        list(read_jsonl(path, 0.1, 0.1))
    path.write_bytes(b'\xef\xbb\xbf{"url": "http://x/1", "caption": "a"}\r\n')  # a BOM and CRLF still read
    assert [r.captions for r in read_jsonl(path, 0.1, 0.1)] == [("a",)]


def test_annotation_file_named_like_the_manifest_is_kept(tmp_path):
    lines = "".join(f'{{"url": "http://x/{i}.jpg", "caption": "c {i}"}}\n' for i in range(3))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "manifest.json").write_text(lines)
    m = prepare(tmp_path / "src", DataParams(source="jsonl", annotations=str(tmp_path / "in" / "manifest.json")))
    assert m.files["annotations"] != "manifest.json"
    assert (tmp_path / "src" / m.files["annotations"]).read_text() == lines
    assert read_manifest(tmp_path / "src") == m and len(list(iter_records(tmp_path / "src"))) == 3


def test_an_unknown_source_names_the_key_and_the_registered_ones(tmp_path):
    from pipeline.core.errors import ParamsError

    (tmp_path / "l.txt").write_text("x\n")
    data = DataParams(source="parquet", annotations=str(tmp_path / "l.txt"))
    with pytest.raises(ParamsError, match=r"data.source: 'parquet' is not one of demo, coco, csv, jsonl, karpathy, tsv"):
        prepare(tmp_path / "out", data)
    assert not (tmp_path / "out").exists()


def test_a_registered_reader_is_a_source_end_to_end(tmp_path, monkeypatch):
    # Adding a source is one registered function: prepare validates with it, the
    # manifest records its name and the download stage reads the records through it.
    from pipeline.prepare import readers
    from pipeline.formats.records import Record

    monkeypatch.setattr(readers, "READERS", dict(readers.READERS))

    @readers.register("lines")
    def _lines(s):
        for i, line in enumerate(s.annotations.read_text().splitlines()):
            url, caption = line.split(" ", 1)
            yield Record(f"l{i:03d}", url, split_for(url, s.val_fraction, s.test_fraction), (caption,))

    (tmp_path / "list.txt").write_text("http://h/a.jpg a cat\nhttp://h/b.jpg a dog\n")
    manifest = prepare(tmp_path / "src", DataParams(source="lines", annotations=str(tmp_path / "list.txt")))
    assert manifest.kind == "lines" and manifest.records == 2
    assert [(r.key, r.captions) for r in iter_records(tmp_path / "src")] == [("l000", ("a cat",)), ("l001", ("a dog",))]


def test_prepare_errors_name_the_users_file_and_line_not_the_copy(tmp_path, loopback):
    # prepare reads a copy in a temporary folder; the message must name the user's file.
    good = "".join(f"caption {i}\thttp://x/{i}.jpg\n" for i in range(6))
    user = tmp_path / "lists" / "captions.tsv"
    user.parent.mkdir()
    user.write_text(good + "broken line\n")
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path / "data" / "source", DataParams(source="tsv", annotations=str(user)))
    assert str(err.value).startswith(f"{user}:7: expected 2 fields") and ".tmp" not in str(err.value)
    coco, _ = coco_fixture("http://h")
    coco["annotations"][1] = {"image_id": 1}  # no caption
    url = loopback.route("/captions.tsv", Reply(200, (good + "broken line\n").encode(), content_type="text/plain"))
    zipped = tmp_path / "ann.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("annotations/captions_val2014.json", json.dumps(coco))
    zip_url = loopback.route("/ann.zip", Reply(200, zipped.read_bytes(), content_type="application/zip"))
    params = {"url": DataParams(source="tsv", annotations=url),
              "zip": DataParams(source="coco", annotations=zip_url + "#captions_val2014.json"),
              "member": DataParams(source="coco", annotations=zip_url + "#nope.json")}
    messages = {}
    for name, p in params.items():
        with pytest.raises(DatasetError) as err:
            prepare(tmp_path / "data" / "source", p, cache_dir=tmp_path / "data" / "cache")
        messages[name] = str(err.value)
    assert messages["url"].startswith(f"{url}:7: expected 2 fields")
    assert messages["zip"].startswith(f"{zip_url}#captions_val2014.json: annotations[1]: needs")
    assert messages["member"].startswith(f"{zip_url}: zip member 'nope.json' not found")
    assert not any(".tmp" in m or "cache" in m for m in messages.values())
