"""The realism filter (GMM-VAE): scores, calibrated thresholds, the check_realism stage and its refusals."""
import numpy as np
import pytest

from actors.checkers import RealismChecker
from factory.errors import FactoryError
from factory.models.realism import GMMVAE
from factory.sample import Sample
from factory.world import make_scene


@pytest.fixture(scope="module")
def realism_folder(tmp_path_factory):
    """A realism model trained here for a few steps (the shipped one is measured by benchmarks/realism.py)."""
    from factory.train.loop import TrainConfig
    from factory.train.realism import train_realism

    tmp = tmp_path_factory.mktemp("realism")
    train_realism(TrainConfig(out=tmp / "run", steps=30, seed=0, threads=1, eval_every=1000),
                  "world:train:128", tmp / "model", "world:train:64:900000", batch=16, test="world:test:16")
    return tmp / "model"


def test_thresholds_are_calibrated_on_held_out_real_scenes(realism_folder):
    model = GMMVAE.from_pretrained(realism_folder)
    t, cal = model.thresholds, model.config["calibration"]
    assert t["distance"] > 0 and t["error"] > 0 and cal["quantile"] == 0.995 and cal["n"] == 64
    real = np.stack([make_scene("test", i).image for i in range(32)])
    scores = model.scores(real)
    assert scores["distance"].shape == (32,) and np.all(scores["error"] >= 0)
    noise = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    assert model.scores(noise)["error"].min() > np.median(scores["error"])


def test_stage_stores_scores_and_filters_what_it_rejects(realism_folder):
    real = Sample("real", 0, make_scene("test", 1).image)
    noise = Sample("noise", 0, np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big = Sample("big", 0, np.zeros((96, 96, 3), np.uint8))
    RealismChecker({"model": str(realism_folder), "filter": True}).process([real, noise, big])
    assert set(real.meta["checks"]["realism"]) >= {"distance", "error", "max_distance", "max_error", "rejected"}
    assert noise.meta["checks"]["realism"]["rejected"] is True
    assert noise.meta["filtered"]["reason"].startswith("off the real data: ")
    assert "96x96" in big.meta["failed"]["reason"] and "factory train realism" in big.meta["failed"]["reason"]


def test_bad_params_and_folders_are_refused(realism_folder):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="less than or equal to 1"):
        RealismChecker.Params(model=str(realism_folder), max_error=2.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        RealismChecker.Params(model=str(realism_folder), max_distance=-1)
    with pytest.raises(ValidationError, match="not a gmm-vae realism model"):
        RealismChecker.Params(model="models/counter")
    with pytest.raises(FactoryError, match="trained on 64x64"):
        GMMVAE.from_pretrained(realism_folder).scores(np.zeros((1, 32, 32, 3), np.uint8))


def test_shipped_filter_passes_real_scenes_and_rejects_broken_ones():
    """models/realism: real test scenes it never saw mostly pass (calibrated to reject about 1 %),
    noise does not."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "models" / "realism"
    model = GMMVAE.from_pretrained(folder)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 3_000_000  # shipped small
    real = np.stack([make_scene("test", i).image for i in range(100)])
    scores = model.scores(real)
    t = model.thresholds
    off = (scores["distance"] > t["distance"]) | (scores["error"] > t["error"])
    assert off.mean() <= 0.05
    noise = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    s = model.scores(noise)
    assert np.all((s["distance"] > t["distance"]) | (s["error"] > t["error"]))
