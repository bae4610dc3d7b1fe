import pytest

import numpy as np

from factory.errors import FactoryError
from factory.sample import Sample
from factory.sources import SourceReader, list_fsc147
from factory.world import count_objects, make_scene
from factory.world import digits as digit_pool
from factory.world.export import write_fsc147, write_world_shards
from factory.world.palette import MIN_CONTRAST, allowed_pairs, contrast
from factory.world.scenes import GAP


def test_scene_is_deterministic_and_labels_agree():
    a, b = make_scene("train", 5), make_scene("train", 5)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    for i in range(50):
        s = make_scene("test", i)
        assert 1 <= s.count <= 12
        assert len(s.points) == len(s.boxes) == len(s.digits) == s.count
        assert abs(float(s.density.sum()) - s.count) < 1e-3
        assert all(0 <= v <= 64 for box in s.boxes for v in box)
        assert str(s.count) not in s.caption.split()  # captions name colours, not counts
        assert s.fg in s.caption and s.bg in s.caption


def test_digits_keep_their_gaps_and_every_count_is_placed():
    counts = set()
    for i in range(200):
        s = make_scene("train", i)
        counts.add(s.count)
        for j, a in enumerate(s.boxes):
            for b in s.boxes[j + 1:]:
                assert a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]
    assert counts == set(range(1, 13))
    many = [make_scene("train", i, count=12) for i in range(20)]
    assert all(s.count == 12 for s in many)  # the jittered grid fallback


def test_train_and_test_handwriting_are_disjoint():
    train, _ = digit_pool.pool("train")
    test, _ = digit_pool.pool("test")
    assert len(train) + len(test) == 1797
    assert not any(np.array_equal(train[-1], t) for t in test[:50])


def test_colour_pairs_have_contrast():
    assert all(contrast(fg, bg) >= MIN_CONTRAST for fg, bg in allowed_pairs())


def test_pixel_counter_counts_real_scenes():
    scenes = [make_scene("test", i) for i in range(300)]
    exact = sum(count_objects(s.image) == s.count for s in scenes)
    assert exact / len(scenes) >= 0.97


def test_world_shards_and_fsc147_export_round_trip(tmp_path):
    index = write_world_shards("test", 12, str(tmp_path / "w"), shard_size=5)
    assert [s["nsamples"] for s in index["shardlist"]] == [5, 5, 2]
    root = write_fsc147("test", 4, str(tmp_path / "fsc"))
    refs = list_fsc147(str(root), "test")
    assert [r.source_key for r in refs] == [f"test_{i:06d}" for i in range(4)]
    reader = SourceReader()
    s = Sample("k", 0, meta={"_source": refs[2].where})
    reader.process([s])
    scene = make_scene("test", 2)
    assert s.alive, s.meta
    # FSC147's images are 384 px high, the scene padded to its own width (tests/test_fsc147.py)
    assert s.image.shape[0] == 384 and s.image.shape[1] >= 384 and s.density.shape == s.image.shape[:2]
    assert s.meta["count"] == scene.count and s.meta["caption"] == scene.caption
    assert abs(float(s.density.sum()) - scene.count) < 1e-3
    assert len(s.meta["boxes"]) == min(3, scene.count)  # FSC147 keeps three exemplar boxes


def test_world_export_resumes_and_refuses_other_scenes(tmp_path):
    """A world export claims its folder like a recipe run: same scenes resume, others are refused."""
    out = str(tmp_path / "w")
    first = write_world_shards("train", 6, out, shard_size=4)
    assert write_world_shards("train", 6, out, shard_size=4) == first  # a rerun changes nothing
    with pytest.raises(FactoryError, match="holds a run of another recipe"):
        write_world_shards("train", 7, out, shard_size=4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FactoryError, match="not a factory output"):
        write_world_shards("train", 6, str(tmp_path / "other"))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
