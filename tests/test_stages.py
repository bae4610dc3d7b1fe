"""The model-free stages: labels must move with the pixels."""
import numpy as np
import pytest

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


def test_augment_is_deterministic_per_seed():
    a, b = world_sample(3), world_sample(3)
    aug = LabelPreservingAugmenter({"hflip": 0.5, "crop": 0.8, "colour_jitter": 0.2})
    aug.process([a])
    aug.process([b])
    assert np.array_equal(a.image, b.image) and a.meta == b.meta


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
