"""The pixel object check: one labelled object, one whole ink blob; it sees merges, splits, losses and extras."""
import numpy as np
import pytest

from actors.checkers import ObjectChecker
from factory.sample import Sample
from factory.world import make_scene
from factory.world.object_check import check_objects
from factory.world.palette import PALETTE
from factory.world.scenes import Glyph, scene_from_glyphs


def _scene(squares, fg="white", bg="black"):
    glyphs = [Glyph(x, y, s, 8, 0) for x, y, s in squares]  # the same 8 everywhere: a closed, thick glyph
    return scene_from_glyphs(glyphs, fg, bg, "train", "test")


def test_real_scenes_pass_as_often_as_the_world_promises():
    scenes = [make_scene("test", i) for i in range(300)]
    passed = [check_objects(s.image, s.points, s.boxes).passed for s in scenes]
    assert np.mean(passed) >= 0.95


def test_two_touching_digits_are_merged_not_counted_right():
    s = _scene([(10, 10, 14), (20, 10, 14), (40, 40, 14)])  # the first two overlap
    r = check_objects(s.image, s.points, s.boxes)
    assert r.merged == 2 and not r.passed
    assert r.matched == 1


def test_a_digit_broken_in_two_is_split():
    s = _scene([(10, 10, 14), (40, 40, 14)])
    image = s.image.copy()
    x0, y0, x1, y1 = s.boxes[0]
    image[(y0 + y1) // 2 - 1: (y0 + y1) // 2 + 2, x0:x1] = PALETTE["black"]  # a 3 px cut, wider than the closing
    r = check_objects(image, s.points, s.boxes)
    assert r.split == 1 and not r.passed


def test_a_one_pixel_break_is_closed():
    s = _scene([(10, 10, 14), (40, 40, 14)])
    image = s.image.copy()
    x0, y0, x1, y1 = s.boxes[0]
    image[(y0 + y1) // 2, x0:x1] = PALETTE["black"]
    assert check_objects(image, s.points, s.boxes).passed


def test_missing_and_extra_objects():
    s = _scene([(10, 10, 14), (40, 40, 14)])
    image = s.image.copy()
    x0, y0, x1, y1 = s.boxes[1]
    image[y0:y1, x0:x1] = PALETTE["black"]  # erase the second digit
    image[45:50, 5:10] = PALETTE["white"]  # a blob where nothing is labelled
    r = check_objects(image, s.points, s.boxes)
    assert (r.missing, r.extra, r.matched) == (1, 1, 1)


def test_points_only_labels_are_checked_too():
    s = _scene([(10, 10, 14), (20, 10, 14), (40, 40, 14)])
    assert check_objects(s.image, s.points).merged == 2
    ok = _scene([(5, 5, 14), (40, 40, 14)])
    assert check_objects(ok.image, ok.points).passed


def _sample(scene, key="k"):
    meta = {"count": scene.count, "points": scene.points, "boxes": scene.boxes, "digits": scene.digits}
    return Sample(key, 0, scene.image, scene.density, meta)


def test_stage_stores_results_and_filters_failures():
    good, bad = _sample(_scene([(5, 5, 14), (40, 40, 14)]), "good"), _sample(_scene([(10, 10, 14), (20, 10, 14)]), "bad")
    stage = ObjectChecker({"filter": True})
    stage.process([good, bad])
    assert good.alive and good.meta["checks"]["objects"]["pass"] is True
    assert bad.meta["checks"]["objects"]["merged"] == 2
    assert bad.meta["filtered"]["stage"] == "check_objects" and "2 merged" in bad.meta["filtered"]["reason"]


def test_stage_rejects_only_the_kinds_asked_for():
    bad = _sample(_scene([(10, 10, 14), (20, 10, 14)]))
    ObjectChecker({"filter": True, "reject": ["split", "extra"]}).process([bad])
    assert bad.alive and bad.meta["checks"]["objects"]["pass"] is False


def test_stage_fails_samples_without_points():
    s = Sample("k", 0, np.zeros((64, 64, 3), np.uint8), None, {"count": 3})
    ObjectChecker({}).process([s])
    assert "no points" in s.meta["failed"]["reason"]


@pytest.mark.parametrize("params, message", [
    ({"reject": ["fused"]}, "unknown failure kind 'fused'"),
    ({"min_legible": 0.9}, "set `digits`"),
    ({"margin": -1}, "greater than or equal to 0"),
])
def test_bad_params_are_refused(params, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ObjectChecker.Params(**params)


DIGITS = "models/digit-classifier"


def test_shipped_digit_classifier_reads_real_handwriting_it_never_saw():
    from scipy import ndimage

    from factory.models.digit_classifier import DigitClassifier

    reader = DigitClassifier.from_pretrained(DIGITS)
    scenes = [make_scene("test", i) for i in range(60)]
    reads = [(r, d) for s in scenes for r, d in zip(reader.read_objects(s.image, s.boxes), s.digits)]
    assert np.mean([r["digit"] == d for r, d in reads]) >= 0.97
    assert np.mean([r["legible"] for r, _ in reads]) >= 0.97
    # The same digits blurred into blobs are not legible.
    blurred = [ndimage.gaussian_filter(s.image.astype(float), (2.5, 2.5, 0)).astype(np.uint8) for s in scenes[:20]]
    legible = [r["legible"] for im, s in zip(blurred, scenes) for r in reader.read_objects(im, s.boxes)]
    assert np.mean(legible) <= 0.1


def test_stage_reads_digits_and_filters_illegible_samples():
    scene = make_scene("test", 3)
    s = _sample(scene)
    ObjectChecker({"digits": DIGITS, "min_digits_kept": 0.9}).process([s])
    check = s.meta["checks"]["objects"]
    assert check["digits_kept"] >= 0.9 and check["legible"] >= 0.9 and len(check["digits_read"]) == scene.count
    wrong = _sample(scene)
    wrong.meta["digits"] = [(d + 1) % 10 for d in scene.digits]  # a label that names other digits
    ObjectChecker({"digits": DIGITS, "min_digits_kept": 0.9, "filter": True}).process([wrong])
    assert wrong.meta["checks"]["objects"]["digits_kept"] <= 0.2
    assert "read as their labelled digit" in wrong.meta["filtered"]["reason"]


def test_a_recipe_whose_source_has_no_points_is_refused_before_any_model_loads(tmp_path):
    from factory.errors import FactoryError
    from factory.pipeline import preflight
    from factory.recipe import parse_recipe

    recipe = parse_recipe({"version": 1, "sources": [{"kind": "latents", "n": 4}],
                           "stages": [{"name": "sample_latent"}, {"name": "check_objects"}]})
    with pytest.raises(FactoryError, match="'check_objects' needs per-object labels .* 'latents' has none"):
        preflight(recipe)
    ok = parse_recipe({"version": 1, "sources": [{"kind": "world", "n": 4}],
                       "stages": [{"name": "render"}, {"name": "check_objects"}]})
    preflight(ok)
