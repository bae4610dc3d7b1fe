"""Train the independent counter (DensityCounter) on real scenes only.

It never sees generated images: it is the check on the generator, not a part
of it. Density regression (CSRNet-style) with the loss on a scaled density,
since per-pixel densities are tiny (a Gaussian peak is ~0.07).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.counter import DensityCounter
from .data import load_training_set
from .diffusion import _log
from .loop import TrainConfig, train

DENSITY_SCALE = 100.0
COUNT_WEIGHT = 0.1  # an L1 term on the whole count, beside the per-pixel loss


def train_counter(cfg: TrainConfig, data: str, folder: Path, batch: int = 32, width: int = 32, depth: int = 5,
                  test: str = "world:test:300") -> None:
    log = _log(cfg.out)
    ts = load_training_set(data)
    held_out = load_training_set(test)
    model = DensityCounter(width, depth)
    log(f"counter: {sum(p.numel() for p in model.parameters())} params, {len(ts)} real training images")

    def pixels(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x, d = pixels(ts.images[idx]), torch.from_numpy(ts.densities[idx])
        if rng.random() < 0.5:  # flips keep a count
            x, d = x.flip(-1), d.flip(-1)
        pred = model(x)
        return F.mse_loss(pred * DENSITY_SCALE, d * DENSITY_SCALE) + COUNT_WEIGHT * F.l1_loss(pred.sum((1, 2)), d.sum((1, 2)))

    def evaluate(step):
        pred = model.count(pixels(held_out.images)).numpy()
        err = np.rint(pred) - held_out.counts
        return {"exact": round(float(np.mean(err == 0)), 4), "mae": round(float(np.mean(np.abs(pred - held_out.counts))), 3)}

    train(cfg, [model], loss_fn, evaluate=evaluate, export=lambda: model.save_pretrained(folder), log=log)
    log(f"saved {folder}")
