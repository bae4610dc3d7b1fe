"""Train the realism filter (``factory train realism``): a GMM-VAE on real scenes only.

Training maximises the ELBO with the KL term against the learnt mixture; the
KL weight ramps up from 0 over the first fifth of the run, so the encoder
first learns codes that reconstruct and the mixture then settles on their
clusters (from the start, a mixture of random components pulls every code to
the nearest mean and the decoder learns the average scene). At export the
thresholds are calibrated on held-out real scenes (``--calibration``, another
range of the training pool than ``--data``), never on generated images.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..models.realism import GMMVAE, calibrate
from .data import load_training_set
from .diffusion import _log
from .loop import TrainConfig, train

DEFAULT_QUANTILE = 0.995


def train_realism(cfg: TrainConfig, data: str, folder: Path, calibration: str, batch: int = 64,
                  latent_dim: int = 32, components: int = 10, quantile: float = DEFAULT_QUANTILE,
                  test: str = "world:test:500") -> None:
    log = _log(cfg.out)
    torch.manual_seed(cfg.seed)
    ts = load_training_set(data)
    held_out = load_training_set(calibration)
    test_set = load_training_set(test)
    size = ts.images.shape[1]
    model = GMMVAE(image_size=size, latent_dim=latent_dim, components=components)
    log(f"realism: {sum(p.numel() for p in model.parameters())} params, {len(ts)} real training images "
        f"({size}x{size}), calibration on {len(held_out)} held-out real images at the {quantile} quantile")
    warm = max(1, cfg.steps // 5)

    def pixels(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)

    def loss_fn(rng, step):
        x = pixels(ts.images[rng.integers(len(ts), size=batch)])
        return model.loss(x, beta=min(1.0, step / warm), generator=torch.Generator().manual_seed(int(rng.integers(2**31))))

    def evaluate(step):
        thresholds, summary = calibrate(model, held_out.images, quantile)
        on_test = model.scores(test_set.images)
        rejected = (on_test["distance"] > thresholds["distance"]) | (on_test["error"] > thresholds["error"])
        return {**summary, "test_rejected": round(float(rejected.mean()), 4),
                "test_psnr": round(float(10 * np.log10(1 / np.mean(on_test["error"]))), 2)}

    def export():
        model.eval()
        thresholds, summary = calibrate(model, held_out.images, quantile)
        model.config.update(thresholds=thresholds, calibration={**summary, "data": calibration})
        model.save_pretrained(folder)
        if (cfg.out / "curve.jsonl").is_file():
            shutil.copy(cfg.out / "curve.jsonl", Path(folder) / "curve.jsonl")
        log(f"saved {folder}: thresholds {thresholds}")

    train(cfg, [model], loss_fn, evaluate=evaluate, export=export, log=log)
