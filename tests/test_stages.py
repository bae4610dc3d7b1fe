"""The model-free stages: labels must move with the pixels."""
import numpy as np
import pytest
from scipy import ndimage

from actors.augmenters import LabelPreservingAugmenter
from actors.checkers import CountChecker
from actors.renderers import LayoutRenderer, parse_colours
from factory.sample import Sample
from factory.sources import SourceReader
from factory.world.pixel_counter import ink_mask


def world_sample(i: int, split="train") -> Sample:
    s = Sample(f"k{i}", i, meta={"_source": {"kind": "world", "split": split, "index": i, "world_seed": 0}})
    SourceReader().process([s])
    return s


def assert_labels_on_ink(s: Sample):
    """Every box holds ink, no ink lies outside the boxes, density peaks sit on points."""
    ink = ink_mask(s.image)
    covered = np.zeros_like(ink)
    for x0, y0, x1, y1 in s.meta["boxes"]:
        x0, y0 = int(np.floor(x0)), int(np.floor(y0))
        x1, y1 = int(np.ceil(x1)), int(np.ceil(y1))
        assert ink[y0:y1, x0:x1].any(), f"box {(x0, y0, x1, y1)} holds no ink"
        covered[max(0, y0 - 1): y1 + 1, max(0, x0 - 1): x1 + 1] = True
    assert not (ink & ~covered).any(), "ink outside every box"
    assert len(s.meta["points"]) == s.meta["count"]
    assert abs(float(s.density.sum()) - s.meta["count"]) < 1e-3
    for x, y in s.meta["points"]:
        assert s.density[int(min(y, s.density.shape[0] - 1)), int(min(x, s.density.shape[1] - 1))] > 0
    assert_mask_on_objects(s)


def assert_mask_on_objects(s: Sample):
    """Mask id i is the i-th object: mostly ink, inside the i-th box, centred on the i-th point;
    ink outside every object is an edge pixel or two, never an object."""
    m, ink = s.mask, ink_mask(s.image)
    assert m is not None and m.shape == s.image.shape[:2]
    assert set(np.unique(m).tolist()) == set(range(s.meta["count"] + 1))
    for i, ((x0, y0, x1, y1), (x, y)) in enumerate(zip(s.meta["boxes"], s.meta["points"]), start=1):
        ys, xs = np.nonzero(m == i)
        assert ink[ys, xs].mean() > 0.6, f"object {i}'s mask is not on its ink"
        assert np.floor(x0) - 1 <= xs.min() and xs.max() < np.ceil(x1) + 1
        assert np.floor(y0) - 1 <= ys.min() and ys.max() < np.ceil(y1) + 1
        assert abs((xs.min() + xs.max() + 1) / 2 - x) <= 1 and abs((ys.min() + ys.max() + 1) / 2 - y) <= 1
    assert (ink & ~ndimage.binary_dilation(m > 0, np.ones((3, 3)))).sum() <= 2


@pytest.mark.parametrize("params", [
    {"hflip": 1.0}, {"hflip": 0.0, "vflip": 1.0}, {"hflip": 0.0, "crop": 0.8},
    {"hflip": 0.0, "resize": 96}, {"hflip": 0.5, "vflip": 0.5, "crop": 0.85, "resize": 64, "colour_jitter": 0.1},
])
def test_augmentations_move_labels_with_pixels(params):
    aug = LabelPreservingAugmenter(params)
    for i in range(25):
        s = world_sample(i)
        count = s.meta["count"]
        aug.process([s])
        assert s.alive, s.meta.get("failed")
        assert s.meta["count"] == count
        assert_labels_on_ink(s)
        assert s.meta["ops"][-1]["op"] == "augment"


def test_colour_jitter_leaves_the_mask_and_crops_keep_every_object_whole():
    jitter = LabelPreservingAugmenter({"hflip": 0.0, "colour_jitter": 0.3})
    crop = LabelPreservingAugmenter({"hflip": 0.0, "crop": 0.3})
    cut = 0
    for i in range(25):
        s = world_sample(i)
        mask = s.mask.copy()
        jitter.process([s])
        assert np.array_equal(s.mask, mask)
        # Boxes of a few exemplars only (as FSC147 gives): the mask still keeps every object in the crop.
        s.meta["boxes"] = s.meta["boxes"][:1]
        areas = np.bincount(mask.ravel(), minlength=s.meta["count"] + 1)
        crop.process([s])
        assert s.alive and s.mask.shape == s.image.shape[:2]
        assert np.array_equal(np.bincount(s.mask.ravel(), minlength=len(areas))[1:], areas[1:])
        cut += s.image.shape[0] * s.image.shape[1] < 64 * 64 * 0.8
    assert cut >= 5  # the crops do cut: around the objects, not through them


def test_augment_is_deterministic_per_seed():
    a, b = world_sample(3), world_sample(3)
    aug = LabelPreservingAugmenter({"hflip": 0.5, "crop": 0.8, "colour_jitter": 0.2})
    aug.process([a])
    aug.process([b])
    assert np.array_equal(a.image, b.image) and a.meta == b.meta and np.array_equal(a.mask, b.mask)


def test_renderer_draws_the_layout_in_the_caption_colours():
    ren = LayoutRenderer({"pool": "test"})
    for i in range(25):
        s = world_sample(i)
        src_points, src_digits = s.meta["points"], s.meta["digits"]
        s.meta["caption"] = "red handwritten digits on a white background"
        ren.process([s])
        assert s.alive, s.meta.get("failed")
        assert s.meta["digits"] == src_digits
        assert s.meta["attributes"]["object_colour"] == "red"
        assert np.abs(np.subtract(s.meta["points"], src_points)).max() <= 1.0
        assert_labels_on_ink(s)


def test_parse_colours_reads_every_caption_template():
    from factory.world.scenes import CAPTION_TEMPLATES

    for t in CAPTION_TEMPLATES:
        cap = t.format(fg="green", bg="orange", a_bg="an orange")
        assert parse_colours(cap) == ("green", "orange"), cap


def test_failed_sample_keeps_its_reason_and_the_batch_goes_on():
    good, bad = world_sample(1), world_sample(2)
    bad.meta["points"] = []
    LayoutRenderer().process([good, bad])
    assert good.alive
    assert bad.meta["failed"]["stage"] == "render" and "no points" in bad.meta["failed"]["reason"]


def test_count_checker_filters_wrong_labels():
    good, wrong = world_sample(4), world_sample(5)
    wrong.meta["count"] += 2
    CountChecker({"tolerance": 0}).process([good, wrong])
    assert good.alive and good.meta["checks"]["count"]["exact"] is True
    assert not wrong.alive and wrong.meta["checks"]["count"]["exact"] is False
