"""Real-size model stacks at random weights (`factory models init`): the published configurations
build into ordinary folders that the stages load as they load downloaded ones. The tests use the
narrowed variants (same topology, image sizes and vocabularies, a fraction of the widths), which
build in seconds; benchmarks/real_size_cpu.py runs the full sizes."""
from __future__ import annotations

import json

import pytest

from factory.cli import main
from factory.models.real_size import NAMES, clip_tokenizer, init_model


@pytest.fixture(scope="module")
def narrow_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-size")
    for name in NAMES:
        if name == "sd15-controlnet":
            continue
        assert main(["models", "init", name, "--narrow", "--out", str(root / name)]) == 0
    assert main(["models", "init", "sd15-controlnet", "--out", str(root / "sd15-controlnet"),
                 "--unet-from", str(root / "sd15")]) == 0
    return root


def test_published_configs_are_the_real_sizes():
    """The configurations (not the narrowed ones) are SD 1.5's, BLIP-2 OPT-2.7B's and CSRNet's."""
    from factory.models.folder import published_config

    unet = published_config("sd15/unet.json")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert published_config("sd15/text_encoder.json")["hidden_size"] == 768
    blip2 = published_config("blip2-opt-2.7b.json")
    assert blip2["text_config"]["hidden_size"] == 2560 and blip2["text_config"]["num_hidden_layers"] == 32
    assert blip2["vision_config"]["num_hidden_layers"] == 39
    from factory.models.counter import CSRNetCounter

    assert 16.0e6 < sum(p.numel() for p in CSRNetCounter().parameters()) < 16.5e6


def test_clip_tokenizer_is_the_real_table(tmp_path):
    tok = clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408 and tok.model_max_length == 77
    ids = tok("a photo of seven handwritten digits")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 8  # one token a word, as in CLIP


def test_load_counter_reads_every_counter_kind(narrow_models, tmp_path):
    from factory.errors import FactoryError
    from factory.models.counter import CSRNetCounter, DensityCounter, load_counter

    assert isinstance(load_counter(narrow_models / "csrnet-counter"), CSRNetCounter)
    DensityCounter(8, 2).save_pretrained(tmp_path / "d")
    assert isinstance(load_counter(tmp_path / "d"), DensityCounter)
    with pytest.raises(FactoryError, match="not a counter"):
        load_counter(narrow_models / "sd15" / "unet")


def test_models_init_refuses_a_non_empty_folder_and_keeps_it(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["models", "init", "csrnet-counter", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert main(["models", "init", "sd15", "--unet-from", "x", "--out", str(tmp_path / "n")]) == 2
    with pytest.raises(SystemExit) as e:  # argparse: an unknown model name
        main(["models", "init", "sd21", "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    with pytest.raises(init_model.__globals__["FactoryError"]):
        init_model("sd21", tmp_path / "m")


def test_hub_id_that_cannot_be_fetched_stops_the_run_before_any_actor(tmp_path, monkeypatch, capsys):
    """An unreachable hub id: exit 2 naming it and what to do, no Ray started, nothing written."""
    from conftest import write_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    r = write_recipe(tmp_path / "r.yaml", sources=[{"kind": "world", "n": 2}],
                     stages=[{"name": "check_clip", "params": {"model": "ViT-B-32/laion2b_s34b_b79k"}},
                             {"name": "check_count", "params": {"counter": "your-org/density-counter"}}])
    assert main(["run", str(r), "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in err and "your-org/density-counter" in err
    assert "huggingface-cli download" in err and "give that folder in the recipe" in err
    assert not (tmp_path / "out").exists()


def test_controlnet_made_for_another_unet_is_refused_at_validation(narrow_models):
    from pydantic import ValidationError

    from factory.stage import get_stage

    gen = get_stage("generate").Params
    with pytest.raises(ValidationError, match="made for another UNet"):
        gen(model=str(narrow_models / "sd15"), controlnet="models/tiny-controlnet")
    with pytest.raises(ValidationError, match="made for another UNet"):
        gen(model="models/tiny-sd", controlnet=str(narrow_models / "sd15-controlnet"))
    gen(model=str(narrow_models / "sd15"), controlnet=str(narrow_models / "sd15-controlnet"))  # made for it


def test_the_readme_real_model_commands_on_an_fsc147_export(narrow_models, tmp_path):
    """README "The real-model path": train the density ControlNet on FSC147, train the counter on
    FSC147, run semaug-sd15 with both, on an FSC147-format export and narrowed SD 1.5 / BLIP-2 /
    OpenCLIP (one training step each: the commands and folders, not the quality)."""
    import yaml

    from factory.loaders import ShardDataset
    from factory.world.export import write_fsc147

    root = narrow_models
    data = write_fsc147("train", 4, str(tmp_path / "FSC147_384_V2"))
    cn, counter = tmp_path / "sd15-controlnet-density", tmp_path / "density-counter-fsc147"
    assert main(["train", "controlnet", "--pipeline", str(root / "sd15"), "--data", f"fsc147:{data}:train",
                 "--resolution", "512", "--crop", "0", "--controlnet", str(cn), "--out", str(tmp_path / "run-cn"),
                 "--batch", "1", "--steps", "1", "--eval-n", "0"]) == 0
    assert main(["train", "counter", "--counter-arch", "csrnet", "--data", f"fsc147:{data}:train",
                 "--resolution", "64", "--export", str(counter), "--out", str(tmp_path / "run-counter"),
                 "--batch", "2", "--steps", "1"]) == 0
    r = yaml.safe_load(open("recipes/semaug-sd15.yaml"))
    r["variants"] = 1
    r["sources"][0].update(path=str(data), limit=2)
    by_name = {s["name"]: s for s in r["stages"]}
    by_name["caption"]["params"]["model"] = str(root / "blip2-opt-2.7b")
    by_name["swap_caption"]["params"]["encoder"] = f"openclip:{root / 'openclip-vit-b-32'}"
    by_name["generate"]["params"].update(model=str(root / "sd15"), controlnet=str(cn), steps=2, dtype="fp32")
    by_name["check_count"]["params"]["counter"] = str(counter)
    by_name["check_clip"]["params"].update(model=str(root / "openclip-vit-b-32"), min_score=None)
    for s in r["stages"]:
        s["resources"] = {"num_cpus": 0.25, "num_gpus": 0}
    r["output"] = {"path": str(tmp_path / "out"), "shard_size": 2, "image_format": "jpg"}
    (tmp_path / "sd15.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "sd15.yaml")]) == 0
    assert main(["run", str(tmp_path / "sd15.yaml"), "--quiet"]) == 0
    rows = list(ShardDataset(str(tmp_path / "out")))
    assert len(rows) == 2
    for s in rows:
        assert tuple(s["image"].shape) == (3, 512, 512) and tuple(s["density"].shape) == (512, 512)
        assert abs(float(s["density"].sum()) - s["count"]) < 0.5 and s["caption"]
        assert {"count", "clip"} <= set(s["json"]["checks"])
        assert len(s["points"]) == s["count"] and bool(((s["points"] >= 0) & (s["points"] < 512)).all())
    assert json.loads((root / "sd15" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
