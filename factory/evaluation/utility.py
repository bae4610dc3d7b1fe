"""Downstream utility: does training on real + synthetic samples beat real only?

The SemAug measure: a counter trained on a few-shot real set, with and
without its synthetic variants mixed in by the training loader
(:class:`~factory.loaders.MixingDataset`, each real sample replaced with
probability p0 by one of its variants), then scored on held-out real scenes.
Both arms train the same model for the same steps at the same batch size, and
see the same real samples; only the replacements differ.

    semaug_recipe(real_dir, ...)                   the SemAug recipe: swap_caption -> generate -> check_count
    train_counter_on(real_dir, synthetic_dir, ...) a DensityCounter trained through the p0 loader
    counting_errors(model, test)                   MAE, RMSE and exact rate on a TrainingSet
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import FactoryError
from ..loaders import MixingDataset, ShardDataset, collate
from ..models.counter import DensityCounter, build_counter
from ..recipe import Recipe, parse_recipe
from ..train.counter import COUNT_WEIGHT, DENSITY_SCALE
from ..train.data import TrainingSet
from .fidelity import SHIPPED_SAMPLER


FILTERS = ("none", "objects", "realism", "both")


def semaug_recipe(real_dir: str, variants: int = 10, p_c: float = 0.5, t_c: float = 0.7,
                  model: str = "models/tiny-sd", controlnet: str = "models/tiny-controlnet",
                  encoder: str = "openclip:models/tiny-clip", sampler: dict | None = None, counter: str = "pixel",
                  tolerance: int | None = None, seed: int = 0, shard_size: int = 1000,
                  filter: str = "none", realism: str = "models/realism") -> Recipe:
    """M variants of each real scene: caption swap (p_c, t_c), density-conditioned generation,
    an independent recount. t_c <= 0 is a random swap and is asked for explicitly. ``filter``
    drops variants the pixel object check fails (``objects``), that the realism filter rejects
    (``realism``), or either (``both``); a real scene whose variants are all dropped stays real.
    ``sampler`` (steps, guidance, control_scale, eta) defaults to the shipped models' settings."""
    if filter not in FILTERS:
        raise FactoryError(f"unknown filter {filter!r}; choose one of {', '.join(FILTERS)}")
    checks = []
    if filter in ("objects", "both"):
        checks.append({"name": "check_objects", "params": {"filter": True}})
    if filter in ("realism", "both"):
        checks.append({"name": "check_realism", "params": {"model": realism, "filter": True}})
    return parse_recipe({
        "version": 1, "name": f"semaug-pc{p_c:g}-tc{t_c:g}", "seed": seed, "variants": variants,
        "op": "semaug",
        "sources": [{"kind": "shards", "path": str(real_dir)}],
        "stages": [
            {"name": "swap_caption", "params": {"p": p_c, "threshold": t_c, "random_swap": t_c <= 0,
                                                "encoder": encoder}},
            {"name": "generate", "params": {"model": model, "controlnet": controlnet,
                                             **(sampler or SHIPPED_SAMPLER)}},
            {"name": "check_count", "params": {"counter": counter, "tolerance": tolerance}},
            *checks,
        ],
        "output": {"shard_size": shard_size},
    })


@dataclass
class TrainedCounter:
    model: torch.nn.Module
    steps: int
    samples_seen: int
    synthetic_seen: int
    seconds: float


def _pixels_and_density(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x, d = batch["image"], batch.get("density")
    if not isinstance(x, torch.Tensor) or not isinstance(d, torch.Tensor):
        raise FactoryError("a training batch needs images of one size and a density map for every sample")
    return x.float(), d.float()


def train_counter_on(real_dir: str, synthetic_dir: str | None = None, p0: float = 0.5, steps: int = 1500,
                     batch: int = 32, seed: int = 0, lr: float = 1e-3, width: int = 32, depth: int = 5,
                     shuffle: int = 1000, arch: str = "density") -> TrainedCounter:
    """A counter (``arch``: the DensityCounter, or the quarter-resolution one) trained for
    ``steps`` batches read by the factory's loaders.

    ``synthetic_dir`` None: real samples only (ShardDataset). Otherwise the p0
    loader (MixingDataset). Model init, shuffling, replacements and flips all
    follow ``seed``; the loss is that of ``factory train counter``.
    """
    torch.manual_seed(seed)
    model = build_counter(arch, width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # The schedule of `factory train` (warm-up, cosine to 10 %): at a constant
    # rate this counter collapsed to predicting zero density (MAE 6.3 after
    # 800 steps on 200 scenes) or oscillated between evaluations.
    warm = min(100, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    if synthetic_dir is None:
        dataset = ShardDataset(real_dir, shuffle=shuffle, seed=seed)
    else:
        dataset = MixingDataset(real_dir, synthetic_dir, p0=p0, seed=seed, shuffle=shuffle)
    real = dataset if isinstance(dataset, ShardDataset) else dataset.real
    if real.nsamples is not None and real.nsamples < batch:
        raise FactoryError(f"{real_dir} has {real.nsamples} samples, fewer than one batch of {batch}")
    loader = DataLoader(dataset, batch_size=batch, collate_fn=collate, drop_last=True)
    rng = np.random.default_rng(seed)
    step = epoch = seen = synthetic = 0
    t0 = time.perf_counter()
    model.train()
    while step < steps:
        dataset.set_epoch(epoch)
        empty = True
        for b in loader:
            empty = False
            x, d = _pixels_and_density(b)
            if rng.random() < 0.5:  # flips keep a count
                x, d = x.flip(-1), d.flip(-1)
            pred = model(x)
            k = model.downsample
            if k > 1:  # objects per k x k cell: the density summed over it
                d = F.avg_pool2d(d[:, None], k)[:, 0] * k * k
            loss = (F.mse_loss(pred * DENSITY_SCALE / k, d * DENSITY_SCALE / k)
                    + COUNT_WEIGHT * F.l1_loss(pred.sum((1, 2)), d.sum((1, 2))))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(x)
            synthetic += int(b["synthetic"].sum()) if "synthetic" in b else 0
            if step == steps:
                break
        if empty:
            raise FactoryError(f"{real_dir} yields no full batch of {batch}: use a smaller batch")
        epoch += 1
    model.eval()
    return TrainedCounter(model, step, seen, synthetic, time.perf_counter() - t0)


def counting_errors(model: torch.nn.Module, test: TrainingSet, chunk: int = 256) -> dict:
    """MAE, RMSE (of the raw count) and exact rate (of the rounded count) on real scenes."""
    preds = []
    with torch.inference_mode():
        for i in range(0, len(test), chunk):
            x = torch.from_numpy(test.images[i: i + chunk]).permute(0, 3, 1, 2).float().div(255)
            preds.append(model.count(x).numpy())
    pred = np.concatenate(preds)
    err = pred - test.counts
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(math.sqrt(np.mean(err**2))),
        "exact": float(np.mean(np.rint(pred) == test.counts)),
        "n": int(len(test)),
    }
