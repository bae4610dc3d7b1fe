"""Train an attribute classifier (the labeller or the independent checker) on real scenes.

Targets are exact: the four binary attributes of
:func:`factory.world.scenes.attributes` and the count, straight from each
scene's labels. The classifiers are later run on *generated* images, which
are slightly blurry and noisy, so training adds mild random Gaussian blur and
pixel noise on top of flips (both keep every attribute and the count).

The checker must be independent of the labeller: another architecture,
another seed and other scenes (``--data world:train:N:START`` with a START
past the labeller's range).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FactoryError
from ..latent.attributes import ATTRIBUTES, COUNTS, attribute_vector, build
from ..world.scenes import make_scene
from .diffusion import _log
from .loop import TrainConfig, train

MAX_BLUR_SIGMA = 1.2  # px; a VAE's reconstructions of these scenes look like sigma 0.5-1
MAX_NOISE = 0.04  # std of pixel noise in [0, 1] units
AUGMENT_P = 0.5  # share of a batch that is blurred (and, independently, noised)
EVAL_BLUR_SIGMA = 0.8


@dataclass
class AttributeSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    attributes: np.ndarray  # (N, 4) float32, ATTRIBUTES order
    counts: np.ndarray  # (N,) int
    mean_sizes: np.ndarray  # (N,) float32, mean digit side in px; NaN where the labels have no sizes

    def __len__(self) -> int:
        return len(self.images)


def load_attribute_set(spec: str, limit: int | None = None) -> AttributeSet:
    """``world:SPLIT:N[:START]`` (scenes START..START+N-1) or a shard folder whose samples
    carry ``attributes`` and ``count`` labels."""
    if spec.startswith("world:"):
        parts = spec.split(":")
        try:
            split, n = parts[1], int(parts[2])
            start = int(parts[3]) if len(parts) > 3 else 0
        except (IndexError, ValueError):
            raise FactoryError(f"bad data spec {spec!r}: write world:SPLIT:N or world:SPLIT:N:START "
                               f"(e.g. world:train:10000:500000)") from None
        scenes = [make_scene(split, i) for i in range(start, start + n)]
        return AttributeSet(np.stack([s.image for s in scenes]),
                            np.stack([attribute_vector(s.labels()["attributes"]) for s in scenes]),
                            np.array([s.count for s in scenes]), np.array([np.mean(s.sizes) for s in scenes], np.float32))
    return _from_shards(spec, limit)


def _from_shards(spec: str, limit: int | None) -> AttributeSet:
    from ..recipe import ShardsSource
    from ..sample import Sample
    from ..sources import SourceReader, list_source

    refs, _ = list_source(ShardsSource(kind="shards", path=spec, limit=limit))
    samples = [Sample(r.id, 0, meta={"_source": r.where}) for r in refs]
    SourceReader().process(samples)
    ok = [s for s in samples if s.alive and all(a in s.meta.get("attributes", {}) for a in ATTRIBUTES)
          and s.meta.get("count") in COUNTS]
    if not ok:
        raise FactoryError(f"no samples in {spec!r} carry the attributes {', '.join(ATTRIBUTES)} and a count "
                           f"in 1-12: train on reference-world scenes (world:train:N) or on shards rendered from them")
    shapes = {s.image.shape for s in ok}
    if len(shapes) > 1:
        raise FactoryError(f"training images in {spec!r} have several sizes {sorted(shapes)[:3]}: resize them first")
    return AttributeSet(np.stack([s.image for s in ok]), np.stack([attribute_vector(s.meta["attributes"]) for s in ok]),
                        np.array([s.meta["count"] for s in ok]),
                        np.array([np.mean(s.meta["sizes"]) if s.meta.get("sizes") else np.nan for s in ok], np.float32))


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def gaussian_blur(x: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Blur each image with its own sigma (0 leaves it unchanged), separable 5-tap kernel."""
    n, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=torch.float32)
    s = torch.as_tensor(np.maximum(sigmas, 1e-3), dtype=torch.float32)[:, None]
    k = torch.exp(-(taps[None] ** 2) / (2 * s**2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 5)
    y = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips, then mild blur and noise on random halves of the batch: what generated images look like."""
    n = len(x)
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    sigmas = np.where(rng.random(n) < AUGMENT_P, rng.uniform(0.3, MAX_BLUR_SIGMA, n), 0.0)
    x = gaussian_blur(x, sigmas)
    noise = np.where(rng.random(n) < AUGMENT_P, rng.uniform(0, MAX_NOISE, n), 0.0)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) \
        * torch.as_tensor(noise, dtype=torch.float32)[:, None, None, None]
    return x.clamp(0, 1)


def evaluate_classifier(model, held_out: AttributeSet, blur: float = 0.0) -> dict:
    """Per-attribute accuracy and the count head's exact rate on held-out scenes."""
    x = pixels(held_out.images)
    if blur:
        x = gaussian_blur(x, np.full(len(x), blur))
    preds = [model.predict(x[i:i + 250]) for i in range(0, len(x), 250)]
    probs = np.concatenate([p["probs"] for p in preds])
    counts = np.concatenate([p["count"] for p in preds])
    acc = ((probs > 0.5) == (held_out.attributes > 0.5)).mean(0)
    out = {f"acc_{a}": round(float(v), 4) for a, v in zip(ATTRIBUTES, acc)}
    out["count_exact"] = round(float(np.mean(counts == held_out.counts)), 4)
    out["count_within_1"] = round(float(np.mean(np.abs(counts - held_out.counts) <= 1)), 4)
    return out


def train_attributes(cfg: TrainConfig, data: str, folder: Path, arch: str, batch: int = 64,
                     test: str = "world:test:500") -> None:
    log = _log(cfg.out)
    torch.manual_seed(cfg.seed)  # the fresh weights depend on the seed, like everything else
    model = build(arch)
    # Training only, never saved: regressing the mean digit size from the features. large_objects
    # (mean size >= 13 px) is a fine threshold on that mean; without this push the classifiers sat at
    # its base rate (74 % after 700 steps) while an ink-box oracle gets 99.7 %.
    size_head = torch.nn.Linear(model.config["hidden"], 1)
    ts = load_attribute_set(data)
    held_out = load_attribute_set(test)
    log(f"attributes ({arch}): {sum(p.numel() for p in model.parameters())} params, {len(ts)} training scenes "
        f"from {data}, {len(held_out)} test scenes; positives per attribute "
        + ", ".join(f"{a} {m:.2f}" for a, m in zip(ATTRIBUTES, ts.attributes.mean(0))))

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x = augment(pixels(ts.images[idx]), rng)
        feats = model.features(x)
        out = model.head(feats)
        attr, count = out[:, : len(ATTRIBUTES)], out[:, len(ATTRIBUTES):]
        target = torch.from_numpy(ts.attributes[idx])
        count_target = torch.from_numpy(ts.counts[idx] - COUNTS[0]).long()
        # Summed over the attributes, not averaged: averaged, the one hard attribute (large_objects,
        # a mean digit size against 13 px) got a quarter of the gradient while the easy three sat at ~0 loss.
        bce = F.binary_cross_entropy_with_logits(attr, target, reduction="none").mean(0).sum()
        sizes = torch.from_numpy(ts.mean_sizes[idx])
        known = ~torch.isnan(sizes)
        size_loss = F.mse_loss(size_head(feats)[known, 0], (sizes[known] - 13) / 3) if known.any() else 0.0
        return bce + F.cross_entropy(count, count_target) + size_loss

    def evaluate(step):
        metrics = evaluate_classifier(model, held_out)
        blurred = evaluate_classifier(model, held_out, blur=EVAL_BLUR_SIGMA)
        # The blurred rates say how far the classifier can be trusted on generated images.
        metrics.update({f"blur_{k}": v for k, v in blurred.items() if k in ("count_exact",) or k.startswith("acc_")})
        return metrics

    def export():
        model.save_pretrained(folder)
        if (cfg.out / "curve.jsonl").is_file():
            shutil.copy(cfg.out / "curve.jsonl", Path(folder) / "curve.jsonl")

    train(cfg, [model, size_head], loss_fn, evaluate=evaluate, export=export, log=log)
    log(f"saved {folder}")
