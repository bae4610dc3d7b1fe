"""`factory train`: every kind runs, checkpoints, resumes and exports (a few steps each)."""
import json

import pytest

from conftest import factory_cli

pytestmark = pytest.mark.slow


def train(*args):
    """`factory train ...` in this process: each command as a subprocess spent most of its time
    importing torch, diffusers and accelerate again (the test took 56 s)."""
    import contextlib
    import io

    from factory.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", *map(str, args), "--threads", "1"])
    assert rc == 0, buf.getvalue()[-3000:]
    return buf.getvalue()


def test_train_the_whole_stack_and_resume(tmp_path):
    pipe, cn = tmp_path / "sd", tmp_path / "cn"
    common = ["--data", "world:train:24", "--pipeline", pipe]
    train("vae", *common, "--out", tmp_path / "vae", "--steps", 2, "--batch", 2, "--checkpoint-every", 1)
    assert (pipe / "model_index.json").is_file() and (pipe / "vae" / "config.json").is_file()
    curve = [json.loads(line) for line in (tmp_path / "vae" / "curve.jsonl").read_text().splitlines()]
    assert "counter_exact_on_reconstructions" in curve[-1]
    out = train("vae", *common, "--out", tmp_path / "vae", "--steps", 3, "--batch", 2)
    assert "resumed from" in out and "step-2" in out

    train("base", *common, "--out", tmp_path / "base", "--steps", 2, "--batch", 2)
    train("controlnet", *common, "--controlnet", cn, "--out", tmp_path / "cnrun", "--steps", 2, "--batch", 2,
          "--eval-n", 2)
    assert json.loads((cn / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert (cn / "density_condition.json").is_file()

    train("counter", "--data", "world:train:24", "--out", tmp_path / "counter", "--export", tmp_path / "c",
          "--steps", 2, "--batch", 2)
    assert (tmp_path / "c" / "model.safetensors").is_file()
    train("clip", "--data", "world:train:24", "--out", tmp_path / "clip", "--export", tmp_path / "clipm",
          "--steps", 2, "--batch", 4)
    assert (tmp_path / "clipm" / "open_clip_config.json").is_file()


def test_train_needs_a_pipeline_first(tmp_path):
    res = factory_cli("train", "base", "--pipeline", tmp_path / "none", "--out", tmp_path / "o")
    assert res.returncode == 2 and "factory train vae" in res.stderr and "Traceback" not in res.stderr
