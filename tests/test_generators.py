"""The SemAug generator stage on a randomly initialised tiny SD + ControlNet (the real code path)."""
import numpy as np
import pytest
from pydantic import ValidationError

from actors.generators import DensityControlNetGenerator, GeneratorParams
from factory.evaluation.fidelity import heldout_layouts


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory):
    from factory.models.tiny_sd import build_components, controlnet_from_unet, save_pipeline_folder

    d = tmp_path_factory.mktemp("tiny")
    comps = build_components(d / "parts", seed=0)
    save_pipeline_folder(d / "sd", comps)
    controlnet_from_unet(comps["unet"]).save_pretrained(d / "cn")
    return d


def gen(tiny_stack, **kw):
    return DensityControlNetGenerator({"model": str(tiny_stack / "sd"), "controlnet": str(tiny_stack / "cn"),
                                       "steps": 2, **kw}, "cpu")


def test_generated_samples_carry_the_conditioning_labels(tiny_stack):
    samples = heldout_layouts(3)
    want = [(s.meta["count"], s.meta["points"], s.density.copy()) for s in samples]
    gen(tiny_stack).process(samples)
    for s, (count, points, density) in zip(samples, want):
        assert s.alive, s.meta.get("failed")
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.meta["count"] == count and s.meta["points"] == points
        assert np.allclose(s.density, density)
        op = s.meta["ops"][-1]
        assert op["op"] == "generate" and op["steps"] == 2 and op["guidance"] == 2.0
        assert op["generator"] == "StableDiffusionControlNetPipeline"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_per_sample_seeds_do_not_depend_on_the_batch(tiny_stack, eta):
    """Also with eta > 0 (the shipped recipes' sampler), whose every step draws fresh noise: it must
    come from the sample's own generator, or shards would depend on how samples were batched."""
    g = gen(tiny_stack, eta=eta, control_scale=2.0)
    together = heldout_layouts(3)
    g.process(together)
    alone = heldout_layouts(3)[1:2]
    g.process(alone)
    assert np.abs(together[1].image.astype(int) - alone[0].image.astype(int)).max() <= 1


def test_caption_only_baseline_needs_no_controlnet(tiny_stack):
    samples = heldout_layouts(2)
    gen(tiny_stack, controlnet=None).process(samples)
    assert all(s.alive for s in samples)
    assert samples[0].meta["ops"][-1]["generator"] == "StableDiffusionPipeline"


def test_bad_samples_fail_with_reasons_and_the_rest_goes_on(tiny_stack):
    ok, no_caption, wrong_shape, negative = heldout_layouts(4)
    no_caption.meta["caption"] = ""
    wrong_shape.density = wrong_shape.density[:32]
    negative.density = negative.density - 1
    gen(tiny_stack).process([ok, no_caption, wrong_shape, negative])
    assert ok.alive
    assert "no caption" in no_caption.meta["failed"]["reason"]
    assert "does not match" in wrong_shape.meta["failed"]["reason"]
    assert "negative" in negative.meta["failed"]["reason"]


def test_wrong_kind_of_model_folder_is_refused_before_loading(tiny_stack):
    with pytest.raises(ValidationError, match="UNet2DConditionModel.*ControlNet"):
        GeneratorParams(model=str(tiny_stack / "sd"), controlnet=str(tiny_stack / "sd" / "unet"))
    with pytest.raises(ValidationError, match="does not exist"):
        GeneratorParams(model="./models/nope", controlnet=None)


def test_generated_images_drop_the_source_mask_and_say_so(tiny_stack):
    from factory.sample import encode_members

    samples = heldout_layouts(2)
    assert all(s.mask is not None for s in samples)  # the real scenes have theirs
    gen(tiny_stack).process(samples)
    for s in samples:
        assert s.alive, s.meta.get("failed")
        assert s.mask is None and "mask" in s.meta["ops"][-1]["labels_dropped"]
        assert "mask.png" not in encode_members(s)


def test_condition_sigma_redraws_the_condition_from_the_points_and_keeps_the_labels(tiny_stack):
    """The ControlNet sees one narrower Gaussian per point, still summing to the count, at the
    points' own places; the sample keeps the world's density map as its label."""
    samples = heldout_layouts(2)
    want = [s.density.copy() for s in samples]
    g = gen(tiny_stack, condition_sigma=0.8)
    s = samples[0]
    cond = g._condition_map(s, (64, 64))
    assert cond.shape == (64, 64) and np.isclose(cond.sum(), s.meta["count"], atol=1e-3)
    assert cond.max() > s.density.max() * 1.5  # narrower peaks than the 1.5 px map
    for x, y in s.meta["points"]:  # each point is the peak of its own neighbourhood
        iy, ix = int(y), int(x)
        window = cond[max(iy - 2, 0):iy + 3, max(ix - 2, 0):ix + 3]
        assert cond[iy, ix] == window.max()
    assert np.array_equal(gen(tiny_stack)._condition_map(s, (64, 64)), s.density)  # unset: the map as it is
    g.process(samples)
    for s, density in zip(samples, want):
        assert s.alive, s.meta.get("failed")
        assert np.allclose(s.density, density)
        assert s.meta["ops"][-1]["condition_sigma"] == 0.8


def test_condition_sigma_needs_points(tiny_stack):
    ok, no_points = heldout_layouts(2)
    del no_points.meta["points"]
    gen(tiny_stack, condition_sigma=0.8).process([ok, no_points])
    assert ok.alive
    assert "condition_sigma" in no_points.meta["failed"]["reason"]
    with pytest.raises(ValidationError, match="condition_sigma"):
        GeneratorParams(model=str(tiny_stack / "sd"), controlnet=str(tiny_stack / "cn"), condition_sigma=0)


def test_condition_sigma_on_a_source_without_points_is_refused_before_any_model_loads(tiny_stack, tmp_path):
    import io
    import json
    import tarfile

    from factory.errors import FactoryError
    from factory.pipeline import preflight
    from factory.recipe import parse_recipe

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:  # captions and density, no points
        for name, data in [("a.txt", b"three digits"), ("a.json", json.dumps({"count": 3}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    params = {"model": str(tiny_stack / "sd"), "controlnet": str(tiny_stack / "cn"), "condition_sigma": 0.8}
    recipe = parse_recipe({"version": 1, "sources": [{"kind": "shards", "path": str(shards)}],
                           "stages": [{"name": "generate", "params": params}]})
    with pytest.raises(FactoryError, match="'generate' needs per-object labels .*condition_sigma"):
        preflight(recipe)
    params.pop("condition_sigma")
    preflight(parse_recipe({"version": 1, "sources": [{"kind": "shards", "path": str(shards)}],
                            "stages": [{"name": "generate", "params": params}]}))
