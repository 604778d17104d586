import h5py
import numpy as np
import pytest

from pipeline.formats.features import (CHUNK_BYTES, FeatureShardError, FeatureTable, list_feature_shards, load_features,
                               read_feature_shard, write_feature_shard)

ATTRS = {"model_id": "m", "model_revision": "r1", "output": "image_embeds", "dtype": "float32",
         "normalized": True, "preprocess": '{"mode": "processor"}', "format_version": 1}


def table(n, dim=512, seed=0, attrs=ATTRS, dtype=np.float32):
    rng = np.random.default_rng(seed)
    keys = [f"k{seed}_{i:04d}" for i in range(n)]
    return FeatureTable(keys=keys, embeddings=rng.normal(size=(n, dim)).astype(dtype),
                        splits=[("train", "val", "test")[i % 3] for i in range(n)],
                        captions=[[f"a caption {i}", "ünïcode <b>html</b>"] for i in range(n)], attrs=dict(attrs))


def test_round_trip_chunks_and_attrs(tmp_path):
    t = table(1500)
    write_feature_shard(tmp_path / "00000.h5", t)
    back = read_feature_shard(tmp_path / "00000.h5")
    assert back.keys == t.keys and back.splits == t.splits and back.captions == t.captions
    np.testing.assert_array_equal(back.embeddings, t.embeddings)
    assert back.attrs == ATTRS
    assert isinstance(back.attrs["normalized"], bool)
    with h5py.File(tmp_path / "00000.h5") as f:
        ds = f["embeddings"]
        chunk_bytes = ds.chunks[0] * ds.chunks[1] * ds.dtype.itemsize
        assert ds.compression is None
        assert ds.chunks[1] == 512 and CHUNK_BYTES // 2 < chunk_bytes <= CHUNK_BYTES
    assert not list(tmp_path.glob("*.tmp"))


def test_float16_and_empty_shard(tmp_path):
    write_feature_shard(tmp_path / "a.h5", table(3, dim=8, dtype=np.float16))
    assert read_feature_shard(tmp_path / "a.h5").embeddings.dtype == np.float16
    empty = FeatureTable(keys=[], embeddings=np.zeros((0, 8), np.float32), splits=[], captions=[], attrs=ATTRS)
    write_feature_shard(tmp_path / "b.h5", empty)
    back = read_feature_shard(tmp_path / "b.h5")
    assert back.embeddings.shape == (0, 8) and back.keys == []


def test_inconsistent_table_is_refused_and_nothing_written(tmp_path):
    t = table(4, dim=8)
    t.splits = t.splits[:3]
    with pytest.raises(FeatureShardError, match="3 splits"):
        write_feature_shard(tmp_path / "x.h5", t)
    assert list(tmp_path.iterdir()) == []


def test_expect_names_attribute_shard_and_both_values(tmp_path):
    write_feature_shard(tmp_path / "00000.h5", table(2, dim=8))
    with pytest.raises(FeatureShardError) as err:
        read_feature_shard(tmp_path / "00000.h5", expect={"model_id": "other"})
    msg = str(err.value)
    assert "00000.h5" in msg and "'model_id'" in msg and "'m'" in msg and "'other'" in msg


def test_load_features_concatenates_in_order_and_filters_split(tmp_path):
    a, b = table(5, dim=8, seed=1), table(4, dim=8, seed=2)
    write_feature_shard(tmp_path / "00001.h5", b)
    write_feature_shard(tmp_path / "00000.h5", a)
    assert [p.name for p in list_feature_shards(tmp_path)] == ["00000.h5", "00001.h5"]
    full = load_features(tmp_path, expect={"output": "image_embeds"})
    assert full.keys == a.keys + b.keys
    np.testing.assert_array_equal(full.embeddings, np.concatenate([a.embeddings, b.embeddings]))
    val = load_features(tmp_path, split="val")
    want = [k for k, s in zip(a.keys + b.keys, a.splits + b.splits) if s == "val"]
    assert val.keys == want and set(val.splits) == {"val"}
    rows = [i for i, k in enumerate(full.keys) if k in want]
    np.testing.assert_array_equal(val.embeddings, full.embeddings[rows])
    assert val.captions == [full.captions[i] for i in rows]


def test_load_features_refuses_mixed_encoders(tmp_path):
    write_feature_shard(tmp_path / "00000.h5", table(2, dim=8, seed=1))
    write_feature_shard(tmp_path / "00001.h5", table(2, dim=8, seed=2, attrs={**ATTRS, "normalized": False}))
    with pytest.raises(FeatureShardError) as err:
        load_features(tmp_path)
    msg = str(err.value)
    assert "00001.h5" in msg and "00000.h5" in msg and "'normalized'" in msg and "False" in msg and "True" in msg


@pytest.mark.parametrize("key,other", [("model_id", "another/clip"), ("model_revision", "f" * 40),
                                       ("output", "pooler_output")])
def test_shards_differing_only_in_encoder_identity_are_not_loaded_together(tmp_path, key, other):
    write_feature_shard(tmp_path / "00000.h5", table(2, dim=8, seed=1))
    write_feature_shard(tmp_path / "00001.h5", table(2, dim=8, seed=2, attrs={**ATTRS, key: other}))
    with pytest.raises(FeatureShardError, match=rf"00001.h5: attribute '{key}' is '{other}', but 00000.h5 has"):
        load_features(tmp_path)


def test_per_shard_attributes_may_differ(tmp_path):
    write_feature_shard(tmp_path / "00000.h5", table(2, dim=8, seed=1, attrs={**ATTRS, "source": "00000.tar"}))
    write_feature_shard(tmp_path / "00001.h5", table(2, dim=8, seed=2, attrs={**ATTRS, "source": "00001.tar"}))
    assert len(load_features(tmp_path)) == 4


def test_unreadable_and_empty_folders(tmp_path):
    (tmp_path / "00000.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureShardError, match="00000.h5"):
        read_feature_shard(tmp_path / "00000.h5")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatureShardError, match="no feature shards"):
        load_features(empty)
