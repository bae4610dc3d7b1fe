"""Calibrated continuous controls: the pixel transforms and measurements, the monotone calibration,
a small fit on the shipped latent-ae (cached), a +6 px shift measured from the pixels, the edit
stage's labels, and bad input caught before any model loads."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import factory_cli
from factory.latent.editors import continuous as C
from factory.sample import Sample

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
GENERATOR = str(ROOT / "models" / "latent-ae")
# Small enough for a test (about 15 s here), big enough for a direction: 8 trajectories of N = 10 steps.
SMALL = {"trajectories": 8, "steps": 10, "iters": 10}


def blob_image(cx=20, cy=30, r=4, size=64):
    x = torch.zeros(1, 3, size, size)
    x[:, 0] = 0.1  # a dark red background
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ink = ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= r * r
    x[:, :, ink] = 1.0
    return x


def test_transforms_move_the_measured_factor_exactly():
    x = blob_image()
    m0 = C.measure(x)
    y, mask = C.transform(x, "x_shift", 6.0)
    m1 = C.measure(y, mask)
    assert m1["cx"][0] - m0["cx"][0] == pytest.approx(6.0, abs=0.05)
    assert m1["cy"][0] == pytest.approx(m0["cy"][0], abs=0.05)
    # the strip the shift brings in from outside the frame is masked out, the rest is not
    assert mask[0, 0, :, :6].sum() == 0 and mask[0, 0, :, 7:].min() == 1
    y, mask = C.transform(x, "y_shift", -5.0)
    assert C.measure(y, mask)["cy"][0] - m0["cy"][0] == pytest.approx(-5.0, abs=0.05)
    # zoom: the ink's linear size; interpolated edges add a few % (a 12 px blob: 1.28 for 1.25)
    y, mask = C.transform(blob_image(32, 32, 12), "zoom", math.log(1.25))
    size = C.factor_value("zoom", C.measure(y, mask)) - C.factor_value("zoom", C.measure(blob_image(32, 32, 12)))
    assert np.exp(size[0]) == pytest.approx(1.25, abs=0.05)
    y, mask = C.transform(x, "brightness", 0.1)
    assert C.measure(y)["brightness"][0] - m0["brightness"][0] == pytest.approx(0.1, abs=0.03)  # clipped at 1
    assert mask.min() == 1


def test_calibration_is_monotone_and_inverts():
    rng = np.random.default_rng(0)
    start = rng.normal(0, 1, 40)
    p0 = np.repeat(start, 5)
    p = p0 + rng.uniform(-2, 2, len(p0))

    def truth(q):  # steeper above 0: a piecewise-linear g
        return np.where(q < 0, 1.0 * q, 3.0 * q)

    dt = truth(p) - truth(p0)
    cal, stats = C.fit_calibration(p0, p, dt, start, truth(start) + 10.0, segments=6, ridge=0.0)
    assert stats["residual_rms"] < 0.1 * stats["dt_rms"]
    grid = np.linspace(p.min(), p.max(), 50)
    g = cal(grid)
    assert np.all(np.diff(g) > 0)
    assert cal.inverse(g) == pytest.approx(grid, abs=1e-6)
    assert cal(np.array([1.0]))[0] - cal(np.array([0.0]))[0] == pytest.approx(3.0, abs=0.3)
    assert cal(np.array([0.0]))[0] == pytest.approx(10.0, abs=0.3)  # anchored at the measured values


def test_points_and_boxes_move_with_the_transform():
    pts, boxes, inside = C.move_points([[10, 20], [60, 5]], [[5, 15, 15, 25], [55, 0, 63, 10]], "x_shift", 6.0, (64, 64))
    assert pts == [[16.0, 20.0], [66.0, 5.0]] and inside == [True, False]
    assert boxes[0] == [11.0, 15.0, 21.0, 25.0] and boxes[1][2] == 64.0  # clipped to the frame
    pts, _, inside = C.move_points([[32, 32], [42, 22]], None, "zoom", math.log(1.5), (64, 64))
    assert pts == [[32.0, 32.0], [47.0, 17.0]] and all(inside)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from factory.latent.editors import fit_or_load

    cache = tmp_path_factory.mktemp("continuous-cache")
    spec = C.continuous_spec("x_shift", GENERATOR, span=8.0, hyper=SMALL)
    art = fit_or_load(spec, cache)
    return art, spec, cache


def test_fit_is_cached_and_keyed_by_its_parameters(fitted):
    from factory.latent.editors import fit_or_load

    art, spec, cache = fitted
    assert not art.from_cache and art.stats["trajectories"] == 8 and art.stats["kept"] == 8  # ceil(0.9 * 8)
    assert float(art.tensors["u"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.asarray(art.stats["slopes"]) > 0)
    again = fit_or_load(spec, cache)
    assert again.from_cache and again.id == art.id
    other = C.continuous_spec("x_shift", GENERATOR, span=6.0, hyper=SMALL)
    from factory.latent.editors import artefact_key

    assert artefact_key(other) != art.id
    assert sorted(p.name.split("-")[1] for p in Path(cache).glob("*.json")) == ["x_shift"]


def test_a_six_pixel_shift_moves_the_ink_barycentre_six_pixels(fitted):
    """+6 px: the calibrated step, refined by warm-started inversion, moves the ink barycentre
    as the pixel transform does: 0.39 / 0.98 px apart at the median / 90th percentile on 32 prior
    codes (measured with a 16-trajectory fit; the pixel transform itself moves it 5.5 +- 0.5 px,
    as ink that leaves the frame stops counting). Asserted here: median < 1 px on 8 codes."""
    from factory.latent.generator import load_generator

    art, _, _ = fitted
    g = load_generator(GENERATOR)
    z = torch.from_numpy(g.sample_latents(list(range(2000, 2008))))
    with torch.no_grad():
        x = g.synthesize(z)
    before = C.factor_value("x_shift", C.measure(x))
    step, reasons = C.shift_codes(art, z, 6.0)
    assert reasons == [None] * 8
    new, mse = C.refine_codes(g, z, step, "x_shift", 6.0, C.refine_stages(art, 6.0), iters=20)
    with torch.no_grad():
        after = C.factor_value("x_shift", C.measure(g.synthesize(new)))
    ideal = C.factor_value("x_shift", C.measure(*C.transform(x, "x_shift", 6.0)))
    change = after - before
    assert np.median(np.abs(change - (ideal - before))) < 1.0, (change, ideal - before)
    assert 4.5 < np.median(change) < 7.0, change
    # beyond the fitted range: left unchanged, with the range in the reason
    same, reasons = C.shift_codes(art, z[:1], 9.0)
    assert torch.equal(same, z[:1]) and "beyond the fitted range -8 px to +8 px" in reasons[0]


def test_edit_stage_labels_requested_and_measured_and_moves_points(fitted, tmp_path):
    from actors.editors import LatentEditor
    from factory.latent.generator import load_generator

    art, _, cache = fitted
    g = load_generator(GENERATOR)
    seeds = [3000, 3001, 3002, 3003]
    z = g.sample_latents(seeds)
    samples = [Sample(f"seed_{s:06d}-xs-00", s, meta={
        "latent": {"z": [float(v) for v in z[i]], "generator": g.model_id},
        "points": [[20.0, 30.0], [61.0, 10.0]], "boxes": [[15, 25, 25, 35], [56, 5, 64, 15]], "count": 2})
        for i, s in enumerate(seeds)]
    params = {"generator": GENERATOR, "editor": "continuous", "factor": "x_shift", "shift": 6, "span": 8,
              "hyper": SMALL, "cache": str(cache), "refine": 20, "tolerance": 0}
    stage = LatentEditor(LatentEditor.prepare(dict(params), {"seed": 0}), device="cpu")
    assert stage.artefacts[0].from_cache  # prepare found the fixture's artefact: same spec, same key
    stage.process(samples)
    for s in samples:
        assert s.alive, s.meta.get("failed")
        e = s.meta["edit"]
        assert e["kind"] == "continuous" and e["factor"] == "x_shift" and e["requested"]["change"] == 6.0
        assert abs(e["measured"]["change"] - e["measured"]["pixel_transform_change"]) < 2.5
        assert s.meta["points"] == [[26.0, 30.0]] and s.meta["count"] == 1 and e["objects_left_frame"] == 1
        assert s.meta["boxes"] == [[21.0, 25.0, 31.0, 35.0]]
        assert s.image.shape == (64, 64, 3) and s.meta["ops"][-1]["op"] == "edit"
    # a tolerance the edits cannot meet fails them with the numbers
    strict = LatentEditor(LatentEditor.prepare({**params, "tolerance": 1e-6, "refine": 0}, {"seed": 0}), device="cpu")
    s = Sample("seed_003000-xs-00", 3000, meta={"latent": {"z": [float(v) for v in z[0]], "generator": g.model_id}})
    strict.process([s])
    assert not s.alive and "where the pixel transform of 6 changes it by" in s.meta["failed"]["reason"]


def test_value_and_distribution_ops(fitted):
    from actors.editors import LatentEditor
    from factory.latent.generator import load_generator

    art, _, cache = fitted
    g = load_generator(GENERATOR)
    z = g.sample_latents([4000, 4001])
    base = {"generator": GENERATOR, "editor": "continuous", "factor": "x_shift", "span": 8, "hyper": SMALL,
            "cache": str(cache), "refine": 0, "tolerance": 0}
    for extra in ({"value": 32.0}, {"distribution": {"uniform": [30, 34]}}):
        stage = LatentEditor(LatentEditor.prepare({**base, **extra}, {"seed": 0}), device="cpu")
        samples = [Sample(f"seed_{4000 + i:06d}-xs-00", 4000 + i,
                          meta={"latent": {"z": [float(v) for v in z[i]], "generator": g.model_id}}) for i in range(2)]
        stage.process(samples)
        for s in samples:
            if not s.alive:  # a scene whose barycentre is more than 8 px from the target
                assert "beyond the fitted range" in s.meta["failed"]["reason"]
                continue
            e = s.meta["edit"]
            want = e["requested"]["value"]
            assert 30 <= want <= 34
            assert e["requested"]["change"] == pytest.approx(want - e["measured"]["before"], abs=1e-3)


BAD = [
    ({"factor": "rotation", "shift": 2}, "x_shift, y_shift, zoom, brightness"),
    ({"factor": "x_shift", "shift": 12}, "beyond the fitted range of x_shift, -8 to 8 px"),
    ({"factor": "zoom", "shift": 1.5}, "beyond the fitted range of zoom, 0.769 to 1.3 x"),
    ({"factor": "x_shift", "shift": 2, "value": 30}, "exactly one of shift, value or distribution; got shift, value"),
    ({"factor": "x_shift"}, "exactly one of shift, value or distribution; got none"),
    ({"shift": 2}, "needs factor"),
    ({"factor": "x_shift", "shift": 2, "attribute": "count"}, "not attribute or sweep"),
    ({"factor": "x_shift", "distribution": {"normal": [0, 1]}}, "one key, uniform, range or histogram"),
    ({"factor": "brightness", "value": 2}, "mean intensities in [0, 1]"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_continuous_params_are_caught_at_validation(extra, message):
    from actors.editors import EditParams

    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EditParams(generator=GENERATOR, editor="continuous", **({"span": 8} if extra.get("factor") != "zoom" else {}),
                   **extra)


def test_other_editors_refuse_continuous_params_and_need_an_attribute():
    from actors.editors import EditParams

    with pytest.raises(ValidationError, match="only editor continuous takes it"):
        EditParams(editor="centroid", attribute="warm_objects", factor="x_shift")
    with pytest.raises(ValidationError, match="attribute is missing"):
        EditParams(editor="centroid")


def test_cli_refuses_a_bad_continuous_recipe_with_exit_2(tmp_path):
    text = (ROOT / "recipes" / "continuous-edit.yaml").read_text().replace(
        "factor: x_shift ", "factor: tilt    ")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    res = factory_cli("validate", bad, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
    assert "tilt" in res.stderr and "x_shift, y_shift, zoom, brightness" in res.stderr
