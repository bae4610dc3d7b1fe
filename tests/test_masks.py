"""Instance masks as labels: exact from the renderer, byte-exact through members and shards."""
import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from factory.inspection import summarise
from factory.masks import as_mask, check_mask, decode_mask, encode_mask, extent, renumber, resize_mask
from factory.sample import Sample, decode_members, encode_members, from_batch, to_batch
from factory.sources import SourceReader
from factory.world import make_scene
from factory.world.export import scene_sample, write_world_shards
from factory.world.pixel_counter import ink_mask
from factory.world.scenes import Glyph, scene_from_glyphs


def assert_exact_mask(scene) -> tuple[int, int, int]:
    """Ids 1..count follow the points; each object's pixels make exactly its box; ink outside
    the objects is a digit's faint edge (alpha <= 0.5, as outside its box): at most a pixel
    more than a pixel away. Returns (ink pixels, ink pixels in the mask, mask pixels)."""
    m = scene.mask
    assert m.dtype == np.uint8 and m.shape == scene.image.shape[:2]
    assert set(np.unique(m).tolist()) == set(range(scene.count + 1))
    for i, (box, point) in enumerate(zip(scene.boxes, scene.points), start=1):
        assert extent(m == i) == box
        assert [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2] == point
    ink = ink_mask(scene.image)
    assert (ink & ~ndimage.binary_dilation(m > 0, np.ones((3, 3)))).sum() <= 1
    return int(ink.sum()), int((ink & (m > 0)).sum()), int((m > 0).sum())


def test_world_scenes_carry_their_exact_instance_masks():
    scenes = [make_scene(split, i) for split in ("train", "test") for i in range(60)]
    scenes.append(make_scene("train", 3, count=12))  # the jittered-grid layout
    ink, both, masked = np.sum([assert_exact_mask(s) for s in scenes], axis=0)
    # The mask is the ink: the pixel counter's ink and the renderer's alpha > 0.5 agree.
    assert both >= 0.99 * ink and both >= 0.95 * masked


def test_a_glyph_clipped_away_leaves_no_id_and_the_others_follow_the_points():
    glyphs = [Glyph(4, 4, 14, 1, 0), Glyph(-40, 30, 14, 2, 1), Glyph(40, 40, 14, 3, 2)]
    scene = scene_from_glyphs(glyphs, "white", "black", "train", "")
    assert scene.count == 2 and scene.digits == [1, 3]
    assert_exact_mask(scene)
    assert extent(scene.mask == 2)[0] >= 40  # the third glyph is the second object


def test_mask_png_round_trip_is_exact_and_deterministic():
    small = make_scene("train", 0).mask
    data = encode_mask(small)
    assert data == encode_mask(small.copy()) and data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_mask(data)
    assert back.dtype == np.uint8 and np.array_equal(back, small)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
    many = (np.arange(40 * 30).reshape(40, 30) % 301).astype(np.int64)  # ids past 255: 16 bit
    back = decode_mask(encode_mask(many))
    assert back.dtype == np.uint16 and np.array_equal(back, many)


def test_bad_masks_are_refused_with_the_reason():
    rgb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match="greyscale object ids, got a PNG of mode RGB"):
        decode_mask(rgb.getvalue())
    with pytest.raises(ValueError, match="instance ids must lie in"):
        as_mask(np.full((4, 4), -1))
    with pytest.raises(ValueError, match="2-D"):
        as_mask(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="does not match the image"):
        check_mask(np.zeros((8, 8), np.uint8), (8, 9, 3), 1)
    with pytest.raises(ValueError, match="names object 3, but the sample has 2 points"):
        check_mask(np.full((8, 8), 3, np.uint8), (8, 8, 3), 2)


def test_renumber_and_resize_keep_ids_as_names():
    m = np.array([[0, 1, 1], [2, 0, 3], [3, 3, 0]], np.uint8)
    assert renumber(m, [2, 0]).tolist() == [[0, 2, 2], [0, 0, 1], [1, 1, 0]]  # object 2 cut
    big = resize_mask(m, (6, 6))
    assert big.dtype == np.uint8 and set(np.unique(big)) == {0, 1, 2, 3}  # nearest: no blended ids
    assert np.array_equal(big[::2, ::2], m)
    assert np.array_equal(resize_mask(big, (3, 3)), m)


def test_members_and_rows_carry_the_mask_exactly():
    s = scene_sample("train", 4)
    members = encode_members(s)
    assert "mask.png" in members and members == encode_members(scene_sample("train", 4))
    back = decode_members(s.key, members)
    assert np.array_equal(back.mask, s.mask) and back.mask.dtype == np.uint8
    assert encode_members(back) == members  # read back and written again: the same bytes
    rows = from_batch(to_batch([s, Sample("bare", 1, image=s.image)]))
    assert np.array_equal(rows[0].mask, s.mask) and rows[0].mask.dtype == s.mask.dtype
    assert rows[1].mask is None and "mask.png" not in encode_members(rows[1])


def test_a_member_that_contradicts_the_labels_is_refused():
    s = scene_sample("train", 4)
    wrong = encode_members(s)
    wrong["mask.png"] = encode_mask(np.full((64, 64), s.meta["count"] + 1, np.uint8))
    with pytest.raises(ValueError, match="names object"):
        decode_members(s.key, wrong)
    wrong["mask.png"] = encode_mask(s.mask[:32])
    with pytest.raises(ValueError, match="does not match the image"):
        decode_members(s.key, wrong)


def tar_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_world_shards_hold_masks_byte_for_byte_and_sources_read_them(tmp_path):
    write_world_shards("train", 6, str(tmp_path / "a"), shard_size=4)
    write_world_shards("train", 6, str(tmp_path / "b"), shard_size=4)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert tar_hash(tmp_path / "a" / name) == tar_hash(tmp_path / "b" / name)
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert "train_000001.mask.png" in names
        data = tar.extractfile("train_000001.mask.png").read()
    assert np.array_equal(decode_mask(data), make_scene("train", 1).mask)
    # The shards as a recipe source, and the world source itself: both load the exact mask.
    url = str(tmp_path / "a" / "shard-000001.tar")
    from_shards = Sample("k0", 0, meta={"_source": {"kind": "shards", "url": url, "key": "train_000005"}})
    from_world = Sample("k1", 0, meta={"_source": {"kind": "world", "split": "train", "index": 5, "world_seed": 0}})
    SourceReader().process([from_shards, from_world])
    for s in (from_shards, from_world):
        assert s.alive, s.meta.get("failed")
        assert np.array_equal(s.mask, make_scene("train", 5).mask)
    summary = summarise(str(tmp_path / "a"))
    assert summary["masks"] == summary["samples"] == 6


def test_a_source_shard_with_a_bad_mask_fails_that_sample_alone(tmp_path):
    from factory.shards import OutputDir, ShardAssembler

    good, bad = scene_sample("train", 0), scene_sample("train", 1)
    members = encode_members(bad)
    members["mask.png"] = encode_mask(bad.mask[:, :10])
    out = OutputDir(str(tmp_path / "src"))
    out.fs.makedirs(out.root, exist_ok=True)
    writer = ShardAssembler(out, {0: 2}, "png")
    writer.add(0, 0, good.key, encode_members(good), {})
    writer.add(0, 1, bad.key, members, {})
    url = str(tmp_path / "src" / "shard-000000.tar")
    samples = [Sample(f"k{i}", i, meta={"_source": {"kind": "shards", "url": url, "key": k}})
               for i, k in enumerate((good.key, bad.key))]
    SourceReader().process(samples)
    assert samples[0].alive and np.array_equal(samples[0].mask, good.mask)
    assert "does not match the image" in samples[1].meta["failed"]["reason"]
