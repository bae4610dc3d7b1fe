import pytest

from conftest import ROOT, factory_cli, write_recipe
from factory.errors import RecipeError
from factory.plan import make_plan
from factory.recipe import load_recipe


def bad(tmp_path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    return str(e.value)


BASE = """\
version: 1
sources:
  - kind: world
    n: 10
stages:
  - name: render
  - name: augment
    params: {hflip: 0.5}
output:
  shard_size: 5
"""


def test_demo_recipe_resolves_defaults():
    r = load_recipe(ROOT / "recipes/demo.yaml")
    d = r.resolved()
    assert d["stages"][1]["params"]["vflip"] == 0.0  # a stage's own defaults are filled in
    assert d["op"] == "render"


def test_malformed_yaml_names_the_line(tmp_path):
    msg = bad(tmp_path, "version: 1\nsources:\n  - kind: world\n   n: 3\n")
    assert "malformed" in msg and "line 4" in msg


def test_unknown_stage_suggests_closest(tmp_path):
    msg = bad(tmp_path, BASE.replace("name: augment", "name: augmnt"))
    assert "stages[1].name (line 7)" in msg and "'augment'" in msg


def test_unknown_field_suggests_closest(tmp_path):
    msg = bad(tmp_path, BASE.replace("shard_size", "shard_sise"))
    assert "output.shard_sise (line 10)" in msg and "did you mean 'shard_size'" in msg
    msg = bad(tmp_path, BASE.replace("hflip", "hflp"))
    assert "stages[1].params.hflp (line 8)" in msg and "did you mean 'hflip'" in msg
    msg = bad(tmp_path, BASE.replace("    n: 10", "    n: 10\n    splt: test"))
    assert "sources[0].splt" in msg and "did you mean 'split'" in msg


@pytest.mark.parametrize("old,new,where", [
    ("n: 10", "n: -3", "sources[0].n (line 4)"),
    ("shard_size: 5", "shard_size: 0", "output.shard_size (line 10)"),
    ("hflip: 0.5", "hflip: 1.5", "stages[1].params.hflip (line 8)"),
    ("hflip: 0.5", "hflip: lots", "stages[1].params.hflip (line 8)"),
    ("version: 1", "version: 2", "version (line 1)"),
])
def test_wrong_values_name_path_and_line(tmp_path, old, new, where):
    msg = bad(tmp_path, BASE.replace(old, new))
    assert where in msg and "got" in msg


def test_missing_or_empty_source_path(tmp_path):
    text = BASE.replace("kind: world\n    n: 10", "kind: shards\n    path: PATH")
    msg = bad(tmp_path, text.replace("PATH", str(tmp_path / "nope")))
    assert "does not exist" in msg and "sources[0].path" in msg
    (tmp_path / "empty").mkdir()
    assert "empty directory" in bad(tmp_path, text.replace("PATH", str(tmp_path / "empty")))


def test_missing_model_path(tmp_path):
    text = BASE + "  - name: check_count\n    params: {counter: ./models/no-such-counter}\n"
    text = text.replace("output:\n  shard_size: 5\n", "") + "output:\n  shard_size: 5\n"
    msg = bad(tmp_path, text)
    assert "does not exist" in msg and "counter" in msg


def test_plan_keys_and_seeds(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "r.yaml"))
    plan = make_plan(r)
    items = list(plan.iter_items())
    keys = [it.key for it in items]
    assert len(keys) == len(set(keys)) == 60
    assert all("." not in k and len(k) <= 100 for k in keys)
    assert keys[0] == "train_000000-render-00"
    assert plan.num_shards == 6 and [it.shard for it in items[9:11]] == [0, 1]
    # Seeds depend on the recipe seed and the key only, not on sharding.
    r2 = load_recipe(write_recipe(tmp_path / "r2.yaml", output={"shard_size": 7}))
    assert [it.seed for it in make_plan(r2).iter_items()] == [it.seed for it in items]
    r3 = load_recipe(write_recipe(tmp_path / "r3.yaml", seed=8))
    assert make_plan(r3).rows(0, 1)[0].seed != items[0].seed


def test_cli_errors_exit_2_without_traceback(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(BASE.replace("name: augment", "name: augmnt"))
    res = factory_cli("validate", p)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout and "augment" in res.stderr
    res = factory_cli("plan", tmp_path / "missing.yaml")
    assert res.returncode == 2 and "not found" in res.stderr
    ok = factory_cli("validate", ROOT / "recipes/demo.yaml")
    assert ok.returncode == 0 and "is valid" in ok.stdout


def test_real_model_recipe_validates_and_plans_here(tmp_path):
    """recipes/semaug-sd15.yaml names hub models and an FSC147 folder: it must validate and plan
    on a machine without the hub (it runs on a GPU cluster)."""
    from factory.world.export import write_fsc147

    write_fsc147("train", 5, str(tmp_path / "data" / "FSC147_384_V2"))
    res = factory_cli("plan", ROOT / "recipes/semaug-sd15.yaml", cwd_override=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "50" in res.stdout and "train_000000-semaug-00" in res.stdout


@pytest.mark.parametrize("name", ["demo", "semaug", "semaug-mini", "attribute-edit", "count-edit", "count-remove",
                                  "invert-edit", "continuous-edit", "slot-count-edit",
                                  "slot-count-remove", "semaug-masks"])
def test_shipped_recipes_validate_and_plan(name):
    """The recipes run on the shipped models: every model path in them exists."""
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    plan = make_plan(r)
    assert plan.total == r.variants * sum(s.n for s in r.sources)


def test_latents_source_plans_one_item_per_seed_and_needs_an_image_stage(tmp_path):
    from factory.errors import FactoryError
    from factory.pipeline import preflight

    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nop: edit\nsources:\n  - kind: latents\n    n: 3\n    start: 5\n"
                 "stages:\n  - name: check_count\n")
    recipe = load_recipe(p)
    assert [it.key for it in make_plan(recipe).iter_items()] == ["seed_000005-edit-00", "seed_000006-edit-00",
                                                          "seed_000007-edit-00"]
    with pytest.raises(FactoryError, match="add `- name: sample_latent`"):
        preflight(recipe)


@pytest.mark.parametrize("name", ["semaug", "semaug-mini", "semaug-masks"])
def test_shipped_semaug_recipes_sample_as_the_benchmarks_measured(name):
    """The tiny SD + ControlNet recipes use the sampler settings the fidelity and utility
    benchmarks measure (factory.evaluation.fidelity.SHIPPED_SAMPLER): the README's figures are
    of the images these recipes make."""
    from factory.evaluation.fidelity import SHIPPED_SAMPLER

    stages = load_recipe(ROOT / "recipes" / f"{name}.yaml").resolved()["stages"]
    params = next(s["params"] for s in stages if s["name"] == "generate")
    assert {k: params[k] for k in SHIPPED_SAMPLER} == SHIPPED_SAMPLER
