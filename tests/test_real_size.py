"""Real-size model stacks at random weights (`factory models init`): the published configurations
build into ordinary folders that the stages load as they load downloaded ones. The tests use the
narrowed variants (same topology, image sizes and vocabularies, a fraction of the widths), which
build in seconds; benchmarks/real_size_cpu.py runs the full sizes."""
from __future__ import annotations

import json

import numpy as np
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
    from factory.models.counter import published_config

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


def test_narrow_stack_runs_the_sd15_recipe_stages_at_512(narrow_models):
    """caption (BLIP-2) -> swap_caption (OpenCLIP) -> generate (SD 1.5 + ControlNet, 512 x 512)
    -> check_count (CSRNet) -> check_clip, called as the actors call them."""
    from factory.stage import get_stage
    from factory.world.export import scene_sample

    root = narrow_models
    samples = [scene_sample("test", i) for i in range(2)]
    counts = [s.meta["count"] for s in samples]
    get_stage("caption")({"model": str(root / "blip2-opt-2.7b"), "only_missing": False, "dtype": "fp32",
                          "max_new_tokens": 8}).process(samples)
    assert all(s.meta["caption"] for s in samples), "the stand-in tokenizer decodes generated ids to text"
    ctx = {"sources": [{"kind": "world", "split": "test", "n": 4}], "seed": 0}
    get_stage("swap_caption")({"p": 0.5, "threshold": 0.7, "encoder": f"openclip:{root / 'openclip-vit-b-32'}"},
                              context=ctx).process(samples)
    get_stage("generate")({"model": str(root / "sd15"), "controlnet": str(root / "sd15-controlnet"), "steps": 2,
                           "size": 512, "dtype": "fp32"}).process(samples)
    for s, n in zip(samples, counts):
        assert not s.meta.get("failed"), s.meta.get("failed")
        assert s.image.shape == (512, 512, 3) and s.density.shape == (512, 512)
        assert abs(float(s.density.sum()) - n) < 1e-2 and s.meta["count"] == n
        assert all(0 <= x < 512 and 0 <= y < 512 for x, y in s.meta["points"])
    get_stage("check_count")({"counter": str(root / "csrnet-counter")}).process(samples)
    get_stage("check_clip")({"model": str(root / "openclip-vit-b-32")}).process(samples)
    for s in samples:
        assert np.isfinite(s.meta["checks"]["count"]["count"]) and "score" in s.meta["checks"]["clip"]
    assert json.loads((root / "sd15" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


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
