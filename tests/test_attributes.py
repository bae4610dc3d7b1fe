"""Attribute classifiers (labeller and checker) and the independent edit checker `check_edit`."""
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from factory.errors import FactoryError
from factory.latent.attributes import (
    ATTRIBUTES, AttributeClassifier, CheckerNet, LabellerNet, check_attribute_name,
)
from factory.sample import Sample, from_batch, to_batch
from factory.world.scenes import Glyph, make_scene, scene_from_glyphs

torch.set_num_threads(1)
SHIPPED_CHECKER = ROOT / "models" / "attr-checker"
COUNTER = ROOT / "models" / "counter"


def test_both_archs_train_resume_and_round_trip(tmp_path, capsys):
    from factory.cli import main
    from factory.train.attributes import train_attributes
    from factory.train.loop import TrainConfig

    # In-process: a CLI subprocess per run would spend most of this test importing.
    def cli(steps):
        return main(["train", "attributes", "--arch", "labeller", "--data", "world:train:16", "--out",
                     str(tmp_path / "lab"), "--export", str(tmp_path / "labm"), "--steps", str(steps), "--batch", "4",
                     "--eval-n", "8", "--threads", "1"])

    assert cli(2) == 0
    curve = [json.loads(line) for line in (tmp_path / "labm" / "curve.jsonl").read_text().splitlines()]
    assert {f"acc_{a}" for a in ATTRIBUTES} | {"count_exact", "blur_count_exact"} <= set(curve[-1])
    assert cli(3) == 0 and "resumed from" in capsys.readouterr().out

    # The checker: another arch, seed and range of scenes.
    train_attributes(TrainConfig(out=tmp_path / "chk", steps=2, seed=1, threads=1), "world:train:16:500000",
                     tmp_path / "chkm", "checker", batch=4, test="world:test:8")
    images = np.stack([make_scene("test", i).image for i in range(3)])
    for folder, cls in ((tmp_path / "labm", LabellerNet), (tmp_path / "chkm", CheckerNet)):
        model = AttributeClassifier.from_pretrained(folder)
        assert type(model) is cls and json.loads((folder / "config.json").read_text())["kind"] == "attribute-classifier"
        out = model.predict(images, with_features=True)
        assert out["probs"].shape == (3, 4) and out["count_probs"].shape == (3, 12) and out["features"].ndim == 2
        assert set(out["count"].tolist()) <= set(range(1, 13))
        model.save_pretrained(tmp_path / "again")
        again = AttributeClassifier.from_pretrained(tmp_path / "again")
        np.testing.assert_allclose(again.predict(images)["probs"], out["probs"], atol=1e-6)


def test_checker_data_is_another_range_of_scenes():
    from factory.train.attributes import load_attribute_set

    ts = load_attribute_set("world:train:2:500000")
    assert np.array_equal(ts.images[1], make_scene("train", 500001).image)
    labels = make_scene("train", 500001).labels()
    assert ts.counts[1] == labels["count"]
    assert ts.attributes[1].tolist() == [float(labels["attributes"][a]) for a in ATTRIBUTES]
    with pytest.raises(FactoryError, match="world:SPLIT:N"):
        load_attribute_set("world:train:many")


def test_folders_of_another_kind_are_refused(tmp_path):
    with pytest.raises(FactoryError, match="density-counter.*factory train attributes"):
        AttributeClassifier.from_pretrained(COUNTER)
    with pytest.raises(FactoryError, match="config.json is missing"):
        AttributeClassifier.from_pretrained(ROOT / "models" / "tiny-clip")
    with pytest.raises(FactoryError, match="not a folder"):
        AttributeClassifier.from_pretrained(tmp_path / "nothing")
    CheckerNet(widths=(8, 8, 8), hidden=8, colour=4).save_pretrained(tmp_path / "chk")
    with pytest.raises(FactoryError, match="checker classifier, not a labeller"):
        LabellerNet.from_pretrained(tmp_path / "chk")


def test_attribute_names_are_checked_with_a_suggestion(tmp_path):
    assert check_attribute_name("many_objects") == "many_objects"
    with pytest.raises(FactoryError, match=r"'warm_object'.*warm_objects, dark_background.*Did you mean 'warm_objects'"):
        check_attribute_name("warm_object")
    LabellerNet(widths=(4, 4, 4), hidden=4).save_pretrained(tmp_path / "lab")
    with pytest.raises(FactoryError, match=f"classifier {tmp_path / 'lab'} knows"):
        check_attribute_name("smiling", tmp_path / "lab")


# --- check_edit on hand-made edits of real scenes ---------------------------------------------

SQUARES = [(4, 4, 15), (34, 4, 15), (4, 34, 15), (34, 34, 15)]  # 15 px: clearly large objects


def scene(n: int, fg: str, bg: str = "white"):
    glyphs = [Glyph(x, y, s, 0, pool_index=7 * i + 3) for i, (x, y, s) in enumerate(SQUARES[:n])]
    return scene_from_glyphs(glyphs, fg, bg, "test", "")


def png64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def edited(key: str, before, after, edit: dict | None) -> Sample:
    meta = {"_before": png64(before.image)} if before is not None else {}
    if edit is not None:
        meta["edit"] = {"editor": "hand-made", "alpha": 2.0, **edit}
    return Sample(key, 0, image=after.image, meta=meta)


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    """The shipped checker; a tiny one trained here when it has not been shipped yet."""
    if SHIPPED_CHECKER.is_dir():
        return SHIPPED_CHECKER
    from factory.train.attributes import train_attributes
    from factory.train.loop import TrainConfig

    tmp = tmp_path_factory.mktemp("checker")
    train_attributes(TrainConfig(out=tmp / "run", steps=20, seed=1, threads=1), "world:train:200:500000",
                     tmp / "model", "checker", batch=16, test="world:test:8")
    return tmp / "model"


def run_check(checker_folder, samples, **params):
    from actors.checkers import EditChecker

    stage = EditChecker({"checker": str(checker_folder), "counter": str(COUNTER), **params}, device="cpu")
    return from_batch(stage(to_batch(samples)))


def test_check_edit_judges_count_and_attribute_edits(checker_folder):
    shipped = checker_folder == SHIPPED_CHECKER
    samples = [
        edited("add-one", scene(3, "blue"), scene(4, "blue"), {"kind": "count", "source_count": 3, "target_count": 4}),
        edited("recolour", scene(3, "blue"), scene(3, "red"), {"kind": "attribute", "attribute": "warm_objects",
                                                              "direction": 1}),
        edited("no-change", scene(3, "blue"), scene(3, "blue"), {"kind": "attribute", "attribute": "warm_objects",
                                                                "direction": 1}),
        edited("no-before", None, scene(3, "blue"), {"kind": "count", "target_count": 4}),
        edited("no-intent", scene(3, "blue"), scene(4, "blue"), None),
        edited("bad-name", scene(3, "blue"), scene(3, "red"), {"kind": "attribute", "attribute": "warm",
                                                              "direction": 1}),
    ]
    out = {s.key: s for s in run_check(checker_folder, samples)}
    assert all("_before" not in s.meta for s in out.values())

    add = out["add-one"].meta["checks"]["edit"]
    assert add["count"] == {"before": 3, "after": 4, "as_intended": True}
    assert add["target"]["changed"] and add["positions_kept"] == 1.0
    assert set(add["others"]) == set(ATTRIBUTES) - {"many_objects"} and 0 <= add["others_mean_change"] <= 1
    assert -1 <= add["identity"] <= 1

    rec = out["recolour"].meta["checks"]["edit"]
    assert rec["target"]["attribute"] == "warm_objects" and rec["count"]["kept"] and rec["positions_kept"] == 1.0
    assert set(rec["others"]) == set(ATTRIBUTES) - {"warm_objects"}
    same = out["no-change"].meta["checks"]["edit"]
    assert same["identity"] == pytest.approx(1.0, abs=1e-4) and max(same["others"].values()) < 1e-4
    assert same["verdict"] == "fail" and not same["target"]["changed"]
    if shipped:  # a tiny model trained for 20 steps cannot be trusted with colours
        assert add["verdict"] == "pass", add
        assert rec["target"]["before"] < 0.5 < rec["target"]["after"] and rec["target"]["changed"], rec
        assert rec["verdict"] == "pass", rec
        assert "did not become True" in same["reason"]

    assert "no pre-edit image" in out["no-before"].meta["failed"]["reason"]
    assert "no meta['edit']" in out["no-intent"].meta["failed"]["reason"]
    assert "Did you mean 'warm_objects'" in out["bad-name"].meta["failed"]["reason"]


def test_check_edit_filters_failed_verdicts(checker_folder):
    samples = [edited("wrong-count", scene(3, "blue"), scene(3, "blue"), {"kind": "count", "source_count": 3,
                                                                          "target_count": 4})]
    (s,) = run_check(checker_folder, samples, filter=True)
    assert s.meta["checks"]["edit"]["count"]["as_intended"] is False
    assert s.meta["filtered"]["stage"] == "check_edit"
    assert "finds 3 objects after the edit, not the intended 4" in s.meta["filtered"]["reason"]


def test_check_edit_fails_count_edits_the_pixels_do_not_confirm(checker_folder):
    """A copy fused with its neighbour: the learned counter may see one more object, but the
    carried labels name two objects where the pixels show one blob."""
    before = scene(1, "blue")
    fused = scene_from_glyphs([Glyph(4, 4, 15, 0, pool_index=3), Glyph(13, 4, 15, 0, pool_index=3)], "blue", "white",
                              "test", "")
    carried = edited("fused", before, fused, {"kind": "count", "source_count": 1, "target_count": 2,
                                             "labels_carried": True})
    carried.meta.update(points=fused.points, boxes=fused.boxes)
    clean = scene(2, "blue")
    ok = edited("clean", before, clean, {"kind": "count", "source_count": 1, "target_count": 2,
                                         "labels_carried": True})
    ok.meta.update(points=clean.points, boxes=clean.boxes)
    dropped = edited("dropped", before, fused, {"kind": "count", "source_count": 1, "target_count": 2})
    out = {s.key: s for s in run_check(checker_folder, [carried, ok, dropped])}
    objects = out["fused"].meta["checks"]["edit"]["objects"]
    assert objects["merged"] == 2 and objects["pass"] is False
    assert "2 merged" in out["fused"].meta["checks"]["edit"]["reason"]
    assert out["clean"].meta["checks"]["edit"]["objects"]["pass"] is True
    blobs = out["dropped"].meta["checks"]["edit"]["objects"]
    assert blobs == {"components": 1, "target_count": 2, "pass": False,
                     "reason": "pixel object check: 1 ink blobs, not the intended 2"}
    (off,) = run_check(checker_folder, [edited("fused", before, fused, {"kind": "count", "source_count": 1,
                                                                         "target_count": 2})], objects=False)
    assert "pixel object check" not in off.meta["checks"]["edit"].get("reason", "")
