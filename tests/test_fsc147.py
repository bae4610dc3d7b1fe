"""The FSC147 export and source as the real dataset (FSC147_384_V2) is: JPEGs 384 px high of
varying width, its annotation/split/class files, adaptive density maps summing to the point
count; and a 384 x W sample brought to a square side keeping its mass, points and boxes."""
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import factory_cli, write_recipe
from factory.errors import FactoryError, RecipeError
from factory.recipe import load_recipe
from factory.sample import Sample, from_batch, to_batch
from factory.sources import (FSC_ANNOTATIONS, FSC_CLASSES, FSC_DENSITY, FSC_IMAGES, FSC_SPLITS, SourceReader,
                             check_fsc147_folder, list_fsc147)
from factory.world import make_scene
from factory.world.export import FSC_ASPECTS, fsc147_image, write_fsc147
from factory.world.palette import PALETTE

N = 5


@pytest.fixture(scope="module")
def fsc(tmp_path_factory):
    return write_fsc147("train", N, str(tmp_path_factory.mktemp("fsc") / "FSC147_384_V2"))


def copy_of(fsc, tmp_path):
    return shutil.copytree(fsc, tmp_path / "FSC147_384_V2")


def read(root, split="train"):
    samples = [Sample(r.id, 0, meta={"_source": r.where}) for r in list_fsc147(str(root), split)]
    SourceReader().process(samples)
    return samples


def ink(image, index):
    """Where scene ``index``'s digits are: pixels more than half way from background to ink colour."""
    scene = make_scene("train", index)
    fg, bg = np.asarray(PALETTE[scene.fg], float), np.asarray(PALETTE[scene.bg], float)
    t = (image.astype(float) - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
    return t > 0.5


def assert_box_holds_its_ink(on_ink, box, margin, tol):
    """The ink around a box (within ``margin``, less than the gap to the next digit) lies in the box,
    and the box is tight on it, to ``tol`` px."""
    h, w = on_ink.shape
    x0, y0 = max(0, math.floor(box[0] - margin)), max(0, math.floor(box[1] - margin))
    x1, y1 = min(w, math.ceil(box[2] + margin)), min(h, math.ceil(box[3] + margin))
    ys, xs = np.nonzero(on_ink[y0:y1, x0:x1])
    assert len(xs), box
    xs, ys = xs + x0, ys + y0
    assert abs(xs.min() - box[0]) <= tol and abs(xs.max() + 1 - box[2]) <= tol, (box, xs.min(), xs.max() + 1)
    assert abs(ys.min() - box[1]) <= tol and abs(ys.max() + 1 - box[3]) <= tol, (box, ys.min(), ys.max() + 1)


def assert_peaks_at(density, points, tol=1.0, radius=5):
    """Around each point, the density is highest at the pixel the point is in (to ``tol`` px)."""
    h, w = density.shape
    for x, y in points:
        x0, y0 = max(0, int(x) - radius), max(0, int(y) - radius)
        window = density[y0: min(h, int(y) + radius + 1), x0: min(w, int(x) + radius + 1)]
        py, px = np.unravel_index(int(np.argmax(window)), window.shape)
        assert abs(px + x0 + 0.5 - x) <= tol and abs(py + y0 + 0.5 - y) <= tol, ((x, y), (px + x0, py + y0))


# --- the export ----------------------------------------------------------------

def test_export_has_fsc147s_files_and_keys(fsc):
    names = [f"train_{i:06d}.jpg" for i in range(N)]
    assert sorted(p.name for p in (fsc / FSC_IMAGES).iterdir()) == names
    assert sorted(p.name for p in (fsc / FSC_DENSITY).iterdir()) == [n.replace(".jpg", ".npy") for n in names]
    splits = json.loads((fsc / FSC_SPLITS).read_text())
    assert splits == {"train": names, "val": [], "test": [], "test_coco": [], "val_coco": []}
    assert (fsc / FSC_CLASSES).read_text().splitlines() == [f"{n}\tdigits" for n in names]
    assert set(json.loads((fsc / "captions.json").read_text())) == set(names)
    ann = json.loads((fsc / FSC_ANNOTATIONS).read_text())
    assert list(ann) == names
    for name, a in ann.items():
        assert set(a) == {"H", "W", "ratio_h", "ratio_w", "points", "box_examples_coordinates",
                          "img_path", "density_path"}
        w, h = Image.open(fsc / a["img_path"]).size
        assert np.load(fsc / a["density_path"]).shape == (h, w)
        # as in FSC147: H, W the size before the resize to 384 px high, ratio_* the resize's factors
        assert a["H"] * a["ratio_h"] == pytest.approx(h) and a["W"] * a["ratio_w"] == pytest.approx(w)
        assert a["ratio_h"] == pytest.approx(a["ratio_w"])  # scaled uniformly: digits are not stretched
        count = make_scene("train", int(name[6:12])).count
        assert len(a["points"]) == count
        quads = a["box_examples_coordinates"]
        assert len(quads) == min(3, count) and all(len(q) == 4 for q in quads)
        for (xa, ya), (xb, yb), (xc, yc), (xd, yd) in quads:  # [[x0,y0],[x0,y1],[x1,y1],[x1,y0]]
            assert xa == xb < xc == xd and ya == yd < yb == yc


def test_images_are_jpegs_384_high_of_varying_width(fsc):
    widths = set()
    for i in range(N):
        im = Image.open(fsc / FSC_IMAGES / f"train_{i:06d}.jpg")
        assert im.format == "JPEG" and im.mode == "RGB" and im.height == 384
        assert FSC_ASPECTS[0] * 384 - 1 <= im.width <= FSC_ASPECTS[1] * 384 + 6
        widths.add(im.width)
    assert len(widths) > 1
    # the padding is the scene's flat background, left and right
    a = np.asarray(Image.open(fsc / FSC_IMAGES / "train_000000.jpg"))
    bg = np.asarray(PALETTE[make_scene("train", 0).bg], float)
    assert np.abs(a[:, :3].astype(float) - bg).max() <= 8 and np.abs(a[:, -3:].astype(float) - bg).max() <= 8


def test_density_sums_are_point_counts_and_peak_at_the_points(fsc):
    ann = json.loads((fsc / FSC_ANNOTATIONS).read_text())
    for name, a in ann.items():
        d = np.load(fsc / FSC_DENSITY / name.replace(".jpg", ".npy"))
        assert d.dtype == np.float32 and d.min() >= 0
        assert abs(float(d.sum()) - len(a["points"])) < 1e-3
        assert_peaks_at(d, a["points"])


def test_points_lie_on_their_digits_and_boxes_hold_their_ink(fsc):
    ann = json.loads((fsc / FSC_ANNOTATIONS).read_text())
    for i in range(N):
        name = f"train_{i:06d}.jpg"
        image = np.asarray(Image.open(fsc / FSC_IMAGES / name))
        h, w = image.shape[:2]
        on_ink = ink(image, i)
        digits = fsc147_image("train", i)  # every digit's box (the annotation keeps three)
        assert digits.points == ann[name]["points"]
        for (x, y), box in zip(digits.points, digits.boxes):
            assert 0 <= x < w and 0 <= y < h
            assert (x, y) == pytest.approx(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))  # as in the scene
            # the digit's ink is around its point: some in the middle half of its box
            bw, bh = box[2] - box[0], box[3] - box[1]
            assert on_ink[int(y - bh / 4): int(y + bh / 4) + 1, int(x - bw / 4): int(x + bw / 4) + 1].any()
            assert_box_holds_its_ink(on_ink, box, margin=8, tol=3)  # digits are 18 px or more apart


# --- the source ------------------------------------------------------------------

def test_round_trip_through_the_source(fsc):
    ann = json.loads((fsc / FSC_ANNOTATIONS).read_text())
    samples = read(fsc)
    assert [s.meta["source_key"] for s in samples] == [f"train_{i:06d}" for i in range(N)]
    for i, s in enumerate(samples):
        name = f"train_{i:06d}.jpg"
        assert s.alive, s.meta
        assert np.array_equal(s.image, np.asarray(Image.open(fsc / FSC_IMAGES / name).convert("RGB")))
        assert np.array_equal(s.density, np.load(fsc / FSC_DENSITY / f"train_{i:06d}.npy"))
        scene = make_scene("train", i)
        assert s.meta["count"] == scene.count and s.meta["caption"] == scene.caption
        assert s.meta["points"] == ann[name]["points"]
        assert s.meta["boxes"] == fsc147_image("train", i).boxes[:3]


def test_png_images_and_missing_density_maps_are_read(fsc, tmp_path):
    root = copy_of(fsc, tmp_path)
    ann, splits = json.loads((root / FSC_ANNOTATIONS).read_text()), json.loads((root / FSC_SPLITS).read_text())
    Image.open(root / FSC_IMAGES / "train_000001.jpg").save(root / FSC_IMAGES / "train_000001.png")
    ann["train_000001.png"] = ann.pop("train_000001.jpg")
    splits["train"][1] = "train_000001.png"
    (root / FSC_ANNOTATIONS).write_text(json.dumps(ann))
    (root / FSC_SPLITS).write_text(json.dumps(splits))
    (root / FSC_DENSITY / "train_000002.npy").unlink()  # made from the points, as FSC147's are
    s = read(root)
    assert all(x.alive for x in s), [x.meta.get("failed") for x in s]
    assert s[1].image.shape[0] == 384 and s[1].meta["count"] == make_scene("train", 1).count
    assert abs(float(s[2].density.sum()) - s[2].meta["count"]) < 1e-3
    assert_peaks_at(s[2].density, s[2].meta["points"])


def test_a_density_map_that_disagrees_with_its_points_fails_that_sample_only(fsc, tmp_path):
    root = copy_of(fsc, tmp_path)
    bad = root / FSC_DENSITY / "train_000003.npy"
    count = make_scene("train", 3).count
    np.save(bad, np.load(bad) * (count + 2) / count)  # two objects too many
    slightly = root / FSC_DENSITY / "train_000004.npy"
    np.save(slightly, np.load(slightly) * 1.01)  # within the tolerance: read
    refs = list_fsc147(str(root), "train")
    batch = to_batch([Sample(r.id, 0, meta={"_source": r.where}) for r in refs])
    out = from_batch(SourceReader()(batch))  # as the pipeline's first stage runs it
    assert [s.alive for s in out] == [True, True, True, False, True]
    failed = out[3].meta["failed"]
    assert failed["stage"] == "read"
    assert "train_000003.npy" in failed["reason"] and f"{count + 2:.3f}" in failed["reason"]
    assert f"train_000003.jpg {count} points" in failed["reason"]


@pytest.mark.parametrize("missing", [FSC_ANNOTATIONS, FSC_SPLITS, FSC_IMAGES])
def test_a_folder_without_fsc147s_files_is_a_clear_error(fsc, tmp_path, missing):
    root = copy_of(fsc, tmp_path)
    (shutil.rmtree if (root / missing).is_dir() else lambda p: p.unlink())(root / missing)
    says = f"{missing} is missing there; an FSC147 folder .* holds {FSC_ANNOTATIONS}"
    for call in (lambda: check_fsc147_folder(str(root)), lambda: list_fsc147(str(root), "train")):
        with pytest.raises(FactoryError, match=says):
            call()
    # in a recipe: at validation, with the YAML line
    r = write_recipe(tmp_path / "r.yaml", sources=[{"kind": "fsc147", "path": str(root)}])
    with pytest.raises(RecipeError, match=rf"sources\[0\]\.path \(line \d+\): .*{missing} is missing"):
        load_recipe(r)
    # an object-store path is not looked at while validating: the plan says it, before any actor starts
    from factory.plan import make_plan

    r = write_recipe(tmp_path / "u.yaml", sources=[{"kind": "fsc147", "path": f"file://{root}"}])
    with pytest.raises(FactoryError, match=f"{missing} is missing"):
        make_plan(load_recipe(r))


def test_cli_plan_and_run_refuse_a_folder_without_annotations(fsc, tmp_path):
    root = copy_of(fsc, tmp_path)
    (root / FSC_ANNOTATIONS).unlink()
    r = write_recipe(tmp_path / "r.yaml", sources=[{"kind": "fsc147", "path": str(root)}])
    for args in (("plan", r), ("run", r, "--out", tmp_path / "out")):
        res = factory_cli(*args, timeout=120)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stdout + res.stderr
        assert FSC_ANNOTATIONS in res.stderr and "is missing" in res.stderr
    assert not (tmp_path / "out").exists()


# --- brought to a square side --------------------------------------------------

def _boxes_hold_ink_after(s, i):
    on_ink = ink(s.image, i)
    for box in s.meta["boxes"]:
        assert_box_holds_its_ink(on_ink, box, margin=4, tol=2.5)


def test_augment_resize_and_crop_keep_mass_and_move_points_and_boxes(fsc):
    from factory.stage import get_stage

    for params in ({"hflip": 0.0, "resize": 384}, {"hflip": 0.0, "crop": 0.5, "resize": 384}):
        samples = read(fsc)
        before = [(s.image.shape[:2], [list(p) for p in s.meta["points"]]) for s in samples]
        get_stage("augment")(params).process(samples)
        for i, (s, ((h, w), points)) in enumerate(zip(samples, before)):
            assert s.alive, s.meta
            assert s.image.shape == (384, 384, 3) and s.density.shape == (384, 384)
            assert abs(float(s.density.sum()) - s.meta["count"]) < 1e-3
            assert all(0 <= x < 384 and 0 <= y < 384 for x, y in s.meta["points"])  # no object is cut
            if "crop" not in params:  # each axis by its own factor
                assert s.meta["points"] == [[round(x * 384 / w, 3), round(y * 384 / h, 3)] for x, y in points]
            assert_peaks_at(s.density, s.meta["points"])
            _boxes_hold_ink_after(s, i)


def test_generator_labels_a_384_by_w_sample_at_its_square_side(fsc):
    from actors.generators import DensityControlNetGenerator, GeneratorParams

    gen = object.__new__(DensityControlNetGenerator)  # _label alone: no pipeline is loaded
    gen.params, gen.pipe, gen.gain = GeneratorParams.model_construct(model="m", controlnet="c", steps=1, guidance=1.0,
                                                                     control_scale=1.0, eta=0.0), object(), 1.0
    for i, s in enumerate(read(fsc)):
        h, w = s.image.shape[:2]
        points, boxes = s.meta["points"], s.meta["boxes"]
        resized = np.asarray(Image.fromarray(s.image).resize((256, 256), Image.BILINEAR))  # stands for the output
        gen._label(s, resized, (256, 256))
        assert s.density.shape == (256, 256) and abs(float(s.density.sum()) - len(points)) < 1e-3
        assert s.meta["count"] == len(points)
        np.testing.assert_allclose(s.meta["points"], [[x * 256 / w, y * 256 / h] for x, y in points])
        np.testing.assert_allclose(s.meta["boxes"], [[b[0] * 256 / w, b[1] * 256 / h, b[2] * 256 / w, b[3] * 256 / h]
                                                     for b in boxes])
        assert_peaks_at(s.density, s.meta["points"])
        _boxes_hold_ink_after(s, i)


def test_training_sets_from_the_export(fsc):
    from factory.train.data import load_training_set

    ts = load_training_set(f"fsc147:{fsc}:train", size=64)
    assert ts.images.shape == (N, 64, 64, 3) and ts.densities.shape == (N, 64, 64)
    assert np.abs(ts.densities.sum(axis=(1, 2)) - ts.counts).max() < 1e-3
    assert list(ts.counts) == [make_scene("train", i).count for i in range(N)]
    with pytest.raises(FactoryError, match="several sizes.*384 px high.*--resolution"):
        load_training_set(f"fsc147:{fsc}:train")
    with pytest.raises(FactoryError, match="split 'val2' is not in"):
        load_training_set(f"fsc147:{fsc}:val2", size=64)
