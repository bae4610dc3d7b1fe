"""Masks for images nobody drew: the ReDO mask model, its training, the point split and the segment stage."""
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from actors.segmenters import Segmenter
from factory.errors import FactoryError, RecipeError
from factory.models.redo import CompositeDiscriminator, MaskNetwork, ReDO
from factory.recipe import parse_recipe
from factory.sample import Sample
from factory.segmentation import (border_colour_foreground, foreground_scores, instance_ious, points_on_ink,
                                  split_instances)
from factory.world import make_scene

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "redo"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """ReDO trained here for 4 steps, then resumed to 6 (the shipped model is measured by
    benchmarks/segmentation.py)."""
    from factory.train.loop import TrainConfig
    from factory.train.redo import train_redo

    tmp = tmp_path_factory.mktemp("redo")

    def run(steps):
        train_redo(TrainConfig(out=tmp / "run", steps=steps, seed=0, threads=1, eval_every=2, checkpoint_every=2),
                   "world:train:32", tmp / "model", batch=4, test="world:test:8", channels=(8, 8, 8), codes=4)

    run(4)
    first = (tmp / "run" / "curve.jsonl").read_text().splitlines()
    run(6)
    return tmp, first


def test_training_checkpoints_resumes_and_exports(tiny_run):
    tmp, first = tiny_run
    log = (tmp / "run" / "train.log").read_text()
    assert "resumed from" in log and "step-4" in log
    rows = [json.loads(line) for line in (tmp / "run" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and len(first) == 2
    assert {"accuracy", "iou", "paper_iou", "smaller_region", "d_loss", "rec", "floor", "binary"} <= set(rows[-1])
    cfg = json.loads((tmp / "model" / "config.json").read_text())
    assert cfg["kind"] == "redo-mask" and cfg["image_size"] == 64 and cfg["arch"] == "pixel"
    assert cfg["training"]["adversarial_weight"] == 1.0 and cfg["training"]["binarize_weight"] > 0
    assert cfg["evaluation"]["test"] == "world:test:8" and cfg["training"]["steps"] == 6
    assert (tmp / "model" / "curve.jsonl").is_file()


def test_training_continues_from_a_mask_model(tiny_run, tmp_path):
    from factory.train.loop import TrainConfig
    from factory.train.redo import train_redo

    tmp, _ = tiny_run
    train_redo(TrainConfig(out=tmp_path / "run", steps=1, seed=1, threads=1, eval_every=1, checkpoint_every=1),
               "world:train:8", tmp_path / "model", batch=2, test="world:test:4", codes=4, init=tmp / "model",
               adversarial_weight=0.0)
    assert "mask network from" in (tmp_path / "run" / "train.log").read_text()
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["channels"] == [8, 8, 8] and cfg["training"]["init"] == str(tmp / "model")
    assert cfg["training"]["adversarial_weight"] == 0.0  # the ablation without the discriminator


def test_the_object_side_is_cut_per_image_between_the_masks_two_modes():
    """ReDO names no region: the object is the smaller side of each image's two modes, whichever
    region holds it, and thresholding the result at 0.5 gives that cut."""
    from factory.models.redo import split_foreground

    a = np.full((8, 8), 0.9, np.float32)
    a[2:4, 2:4] = 0.2          # the object in region 1 (low values), 4 of 64 pixels
    b = np.full((8, 8), 0.1, np.float32)
    b[5:7, 1:6] = 0.7          # the object in region 0 (high values), 10 of 64 pixels
    flat = np.full((8, 8), 0.6, np.float32)  # one mode: no object
    out = split_foreground(np.stack([a, b, flat]))
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    assert np.array_equal(out[0] >= 0.5, a < 0.5) and np.array_equal(out[1] >= 0.5, b > 0.5)
    assert not (out[2] >= 0.5).any()
    assert out[0][2, 2] > out[0][3, 3] - 1e-6 and out[1][5, 1] > 0.5  # a probability, not a 0/1 map


def test_mask_model_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ReDO(64, (8, 8, 8), codes=4)
    x = torch.rand(3, 3, 64, 64)
    codes = model.sample_codes(np.random.default_rng(0), 3)
    assert codes.shape == (3, 2) and codes.dtype == torch.int64 and 0 <= int(codes.min()) <= int(codes.max()) < 4
    regions, composites, redrawn = model.redraw(x, codes)
    assert regions.shape == (3, 2, 64, 64) and torch.allclose(regions.sum(1), torch.ones(3, 64, 64))
    assert composites.shape == (3, 2, 3, 64, 64) and redrawn.shape == (3, 3, 64, 64)
    assert model.encoder(redrawn).shape == (3, 2, 4) and CompositeDiscriminator(8)(x).shape == (3,)
    assert float(model.code_loss(redrawn, codes)) > 0
    # A region is redrawn in one codebook colour chosen given the rest's mean colour; 1 - M_k keeps
    # the original where the region is not.
    m0, rest = regions[:, :1], regions[:, 1:]
    context = (x * rest).sum((2, 3)) / rest.sum((2, 3))
    drawn = model.generators[0](codes[:, 0], context)
    colours = torch.sigmoid(model.generators[0].palette)
    assert all(any(torch.allclose(c, p) for p in colours) for c in drawn)
    assert torch.allclose(composites[:, 0], m0 * drawn[:, :, None, None] + (1 - m0) * x, atol=1e-6)
    model.mask.save_pretrained(tmp_path / "m")
    loaded = MaskNetwork.from_pretrained(tmp_path / "m")
    images = np.stack([make_scene("test", i).image for i in range(4)])
    p = model.mask.foreground(images)
    assert p.shape == (4, 64, 64) and p.dtype == np.float32 and (0 <= p).all() and (p <= 1).all()
    assert np.abs(loaded.foreground(images) - p).max() < 2e-2  # fp16 on disk
    with pytest.raises(FactoryError, match="trained on 64x64.*factory train redo"):
        loaded.foreground(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(FactoryError, match="not a redo-mask"):
        MaskNetwork.from_pretrained(ROOT / "models" / "counter")
    # A folder from before the arch was recorded (a U-Net with one fixed foreground region) is
    # refused with what to do, not a TypeError from the constructor.
    old = json.loads((tmp_path / "m" / "config.json").read_text())
    del old["arch"]
    (tmp_path / "m" / "config.json").write_text(json.dumps({**old, "foreground_region": 1}))
    with pytest.raises(FactoryError, match="names no mask arch.*train it again"):
        MaskNetwork.from_pretrained(tmp_path / "m")


def test_split_follows_the_points_and_measures():
    scene = make_scene("test", 5)
    truth = scene.mask
    ids = split_instances(truth > 0, scene.points)
    assert np.array_equal(ids, truth)  # the exact foreground splits back into the exact instances
    reversed_ids = split_instances(truth > 0, scene.points[::-1])
    assert np.array_equal(reversed_ids[truth > 0], scene.count + 1 - truth[truth > 0])
    assert instance_ious(ids, truth, scene.count) == [1.0] * scene.count
    # Two touching blobs are cut between their points; a blob far from every point stays background.
    fg = np.zeros((32, 32), bool)
    fg[10:14, 2:20] = True
    fg[28:31, 28:31] = True
    two = split_instances(fg, [[4.0, 12.0], [18.0, 12.0]])
    assert set(np.unique(two[10:14, 2:6])) == {1} and set(np.unique(two[10:14, 16:20])) == {2}
    assert (two[28:31, 28:31] == 0).all()
    # A point off the ink (the hole of a 0) snaps to the nearest foreground; one with none near is empty.
    ring = np.zeros((20, 20), bool)
    ring[4:12, 4:12] = True
    ring[6:10, 6:10] = False
    far = split_instances(ring, [[8.0, 8.0], [19.0, 19.0]])
    assert (far[ring] == 1).all() and not (far == 2).any()
    assert points_on_ink(far, ring, 2) == [True, False]
    s = foreground_scores(np.stack([truth > 0]), np.stack([truth > 0]))
    assert s["accuracy"] == 1.0 and s["iou"] == 1.0
    assert foreground_scores(border_colour_foreground(scene.image)[None] > 0.5, (truth > 0)[None])["iou"] > 0.9


def _generated(i: int) -> Sample:
    """A world scene as a generated sample: its labels, no mask (as `generate` leaves it)."""
    s = make_scene("test", i)
    return Sample(f"s{i}", i, s.image.copy(), s.density, {"caption": s.caption, **s.labels()})


def test_segment_stage_writes_instance_masks_in_points_order():
    samples = [_generated(i) for i in range(6)]
    Segmenter({"model": "pixel"}).process(samples)
    for i, s in enumerate(samples):
        truth = make_scene("test", i).mask
        assert s.mask.shape == (64, 64) and s.mask.dtype == np.uint8
        assert np.mean(instance_ious(s.mask, truth, len(s.meta["points"]))) > 0.9
        assert s.meta["ops"][-1]["op"] == "segment" and s.meta["ops"][-1]["model"] == "pixel"
        check = s.meta["checks"]["segment"]
        assert len(check["object_confidence"]) == s.meta["count"] and check["empty_objects"] == 0


def test_segment_stage_keeps_exact_masks_fails_bad_samples_and_filters_empty(tiny_run):
    tmp, _ = tiny_run
    exact = _generated(1)
    exact.mask = make_scene("test", 1).mask
    kept = exact.mask.copy()
    big = Sample("big", 0, np.zeros((96, 96, 3), np.uint8), meta={"points": [[3.0, 3.0]]})
    nopoints = Sample("nopoints", 0, make_scene("test", 2).image)
    fresh = _generated(3)
    Segmenter({"model": str(tmp / "model")}).process([exact, big, nopoints, fresh])
    assert np.array_equal(exact.mask, kept) and "ops" not in exact.meta
    assert "96x96" in big.meta["failed"]["reason"] and "64x64" in big.meta["failed"]["reason"]
    assert "no points" in nopoints.meta["failed"]["reason"]
    assert fresh.mask.shape == (64, 64) and fresh.mask.max() <= fresh.meta["count"]
    assert fresh.meta["ops"][-1]["model"] == str(tmp / "model")
    # Ids never exceed the points; a blank image leaves every object empty, and filter_empty drops it.
    blank = Sample("blank", 0, np.full((64, 64, 3), 200, np.uint8), meta={"points": [[10.0, 10.0]]})
    Segmenter({"model": "pixel", "filter_empty": True}).process([blank])
    assert blank.meta["checks"]["segment"]["empty_objects"] == 1 and "got no mask pixel" in blank.meta["filtered"]["reason"]
    again = _generated(1)
    again.mask = kept.copy()
    Segmenter({"model": "pixel", "overwrite": True}).process([again])
    assert again.meta["ops"][-1]["replaced_mask"] is True


def test_a_mask_model_of_another_size_is_refused_at_validation(tmp_path):
    MaskNetwork(32, (8, 8, 8)).save_pretrained(tmp_path / "m32")
    with pytest.raises(ValidationError, match=r"trained on 32x32 images but this stage will see 64x64.*factory train redo"):
        Segmenter.Params(model=str(tmp_path / "m32"))
    assert Segmenter.Params(model=str(tmp_path / "m32"), image_size=32).image_size == 32
    with pytest.raises(ValidationError, match="not a mask model.*factory train redo.*factory train slots"):
        Segmenter.Params(model=str(ROOT / "models" / "counter"))
    recipe = {"version": 1, "sources": [{"kind": "world", "n": 2}],
              "stages": [{"name": "segment", "params": {"model": str(tmp_path / "m32"), "overwrite": True}}]}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.params.*32x32"):
        parse_recipe(recipe)


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped mask model (models/redo)")
def test_shipped_mask_model_finds_the_digits():
    scenes = [make_scene("test", i) for i in range(1000, 1032)]
    model = MaskNetwork.from_pretrained(SHIPPED)
    pred = model.foreground(np.stack([s.image for s in scenes])) >= 0.5
    scores = foreground_scores(pred, np.stack([s.mask > 0 for s in scenes]))
    # benchmarks/segmentation.py: 0.990 / 0.880 on 2 x 500 test scenes; the model-free rule 0.9985
    assert scores["accuracy"] > 0.97 and scores["iou"] > 0.8


def test_the_object_slot_model_is_a_mask_model_too():
    """models/slots, trained without masks, covers the foreground with its objects' alphas; the
    segment stage splits it at the points (benchmarks/segmentation.py: IoU 0.75 on 2 x 500 scenes)."""
    samples = [_generated(i) for i in range(8)]
    Segmenter({"model": str(ROOT / "models" / "slots")}).process(samples)
    ious = [np.mean(instance_ious(s.mask, make_scene("test", i).mask, len(s.meta["points"])))
            for i, s in enumerate(samples)]
    assert np.mean(ious) > 0.6, ious
    assert all(s.meta["checks"]["segment"]["empty_objects"] == 0 for s in samples)
    assert samples[0].meta["ops"][-1]["model"].endswith("models/slots")


def test_a_missing_mask_model_fails_validation_with_how_to_train_it(tmp_path, capsys):
    from factory.cli import main

    missing = tmp_path / "no-such-redo"
    with pytest.raises(ValidationError, match=r"does not exist: train one with `factory train redo"):
        Segmenter.Params(model=str(missing))
    recipe = tmp_path / "segment.yaml"
    recipe.write_text(f"version: 1\nsources:\n  - kind: world\n    n: 2\nstages:\n  - name: segment\n"
                      f"    params:\n      model: {missing}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages[0].params.model (line 8)" in err and f"--export {missing}" in err and "Traceback" not in err
    # the default is the shipped object-slot model, so a recipe that names none validates
    parse_recipe({"version": 1, "sources": [{"kind": "world", "n": 2}], "stages": [{"name": "segment"}]})


@pytest.mark.parametrize("args, message", [
    (["--data", "world:valid:10"], "unknown split 'valid'"),
    (["--data", "world:train"], "is not world:SPLIT:N"),
    (["--data", "no/such/shards"], "nor an existing shard folder"),
    (["--export", "models/counter"], "already holds another model"),
    (["--init", "models/counter"], "not a redo-mask"),
    (["--batch", "0"], "--batch must be positive"),
])
def test_train_redo_refuses_bad_input_before_loading_anything(tmp_path, capsys, args, message):
    from factory.cli import main

    assert main(["train", "redo", "--out", str(tmp_path / "run"), "--data", "world:train:8", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_train_redo_refuses_an_init_model_of_another_size(tmp_path, capsys):
    from factory.cli import main

    MaskNetwork(32, (8, 8, 8)).save_pretrained(tmp_path / "m32")
    assert main(["train", "redo", "--out", str(tmp_path / "run"), "--data", "world:train:8",
                 "--init", str(tmp_path / "m32")]) == 2
    assert "mask model of 32x32 images but --data 'world:train:8' has 64x64" in capsys.readouterr().err


def test_the_benchmark_scores_a_model_and_a_shard_folder(tiny_run, tmp_path):
    import subprocess
    import sys

    from factory.world.export import write_world_shards

    tmp, _ = tiny_run
    write_world_shards("train", 3, str(tmp_path / "shards"), 5000, 0, 100)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "segmentation.py"), str(tmp / "model"), "--n", "4",
                          "--shards", str(tmp_path / "shards"), "--threads", "1", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["real"]) == {str(tmp / "model"), "pixel"} and report["real"]["pixel"]["iou"] > 0.9
    shards = report["shards"]["arms"]["pixel"]
    assert shards["n"] == 3 and shards["with_mask"] == 3 and shards["found"] == 1.0 and shards["mask_iou"] > 0.9
    assert "| pixel |" in out.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "segmentation.py"), str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert missing.returncode == 2 and "factory train redo" in missing.stderr and "Traceback" not in missing.stderr
