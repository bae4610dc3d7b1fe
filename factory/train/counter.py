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

from ..errors import FactoryError
from ..models.counter import build_counter
from ..models.folder import save_model_folder
from .data import load_training_set
from .diffusion import _log
from .loop import TrainConfig, train

DENSITY_SCALE = 100.0
COUNT_WEIGHT = 0.1  # an L1 term on the whole count, beside the per-pixel loss


def held_out_for(data: str, eval_n: int = 300) -> str | None:
    """Where a counter trained on ``data`` is evaluated: world test scenes for world data, the
    same FSC147 folder's val split for FSC147 data, none for a shard folder (no split to use)."""
    if data.startswith("fsc147:"):
        path = data[len("fsc147:"):].partition(":")[0]
        return f"fsc147:{path}:val"
    if data.startswith("world:"):
        return f"world:test:{eval_n}"
    return None


def train_counter(cfg: TrainConfig, data: str, folder: Path, batch: int = 32, width: int = 32, depth: int = 5,
                  test: str | None = "world:test:300", arch: str = "density", resolution: int | None = None) -> None:
    """``arch``: density (the shipped DensityCounter), quarter, or csrnet (the real-size counter,
    at its published widths); ``resolution``: resize every image to that square side first (FSC147's
    are 384 px high of varying width)."""
    log = _log(cfg.out)
    ts = load_training_set(data, size=resolution)
    held_out = None
    if test:
        try:
            held_out = load_training_set(test, limit=300, size=resolution)
        except FactoryError as e:  # e.g. an FSC147 export with an empty val split
            log(f"no evaluation: {e}")
    model = build_counter(arch, width, depth)
    k = model.downsample
    side = ts.images.shape[1]
    if side % k or ts.images.shape[2] % k:
        raise FactoryError(f"the {arch} counter needs image sides divisible by {k}, got {ts.images.shape[1:3]}: "
                           f"pass --resolution (e.g. 512)")
    log(f"counter ({arch}): {sum(p.numel() for p in model.parameters())} params, {len(ts)} real training images "
        f"at {side} px")

    def pixels(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x, d = pixels(ts.images[idx]), torch.from_numpy(ts.densities[idx])
        if rng.random() < 0.5:  # flips keep a count
            x, d = x.flip(-1), d.flip(-1)
        if k > 1:  # objects per k x k cell: the density summed over it
            d = F.avg_pool2d(d[:, None], k)[:, 0] * k * k
        pred = model(x)
        return (F.mse_loss(pred * DENSITY_SCALE / k, d * DENSITY_SCALE / k)
                + COUNT_WEIGHT * F.l1_loss(pred.sum((1, 2)), d.sum((1, 2))))

    def evaluate(step):
        with torch.no_grad():
            pred = torch.cat([model.count(pixels(held_out.images[i: i + 16]))
                              for i in range(0, len(held_out), 16)]).numpy()
        err = np.rint(pred) - held_out.counts
        return {"exact": round(float(np.mean(err == 0)), 4), "mae": round(float(np.mean(np.abs(pred - held_out.counts))), 3)}

    def export():
        save_model_folder(folder, model.config, model.state_dict())

    train(cfg, [model], loss_fn, evaluate=evaluate if held_out is not None else None, export=export, log=log)
    log(f"saved {folder}")
