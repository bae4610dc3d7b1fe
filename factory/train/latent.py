"""Train the regularised autoencoder (`factory train latent-ae`): the generator with a
latent space that attribute and count edits move codes in.

Evaluation is by the *independent* counter (models/counter, trained on real
scenes only): the share of test-pool reconstructions whose rounded count equals
the scene's label, beside the same share on the real scenes (the ceiling) and
PSNR. A reconstruction the counter miscounts would turn every count edit built on
it into a wrong label, so this is the number to train for, not the loss.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.latent_ae import LatentAE, code_statistics, fit_prior
from .data import TrainingSet, load_training_set, scenes_training_set, world_scenes
from .diffusion import _log
from .loop import TrainConfig, train
from .pixel_losses import ink_mask_loss, reconstruction_loss

CODE_PENALTY = 1e-3  # RAE's beta on mean(z^2): keeps the code space compact for the ex-post prior
DEFAULT_COUNTER = "models/counter"
DEFAULT_DIGITS = "models/digit-classifier"


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def encode_all(model: LatentAE, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model.encode(pixels(images[i:i + chunk])) for i in range(0, len(images), chunk)]).numpy()


def reconstruct(model: LatentAE, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(pixels(images[i:i + chunk]))[0] for i in range(0, len(images), chunk)])


def counter_agreement(counter, images: torch.Tensor, counts: np.ndarray) -> dict:
    with torch.no_grad():
        pred = counter.count(images).numpy()
    return {"exact": float(np.mean(np.rint(pred) == counts)), "mae": float(np.mean(np.abs(pred - counts)))}


def evaluate_reconstructions(model: LatentAE, counter, test: TrainingSet, reader=None, scenes=None) -> dict:
    """The independent counter's exact rate and PSNR on reconstructions of test scenes; with a
    digit reader and the scenes' labels, also the pixel object check's pass rate and the share
    of objects whose digit the reconstruction keeps (identity) and that read as a digit at all."""
    x = pixels(test.images)
    rec = reconstruct(model, test.images)
    on_rec = counter_agreement(counter, rec, test.counts)
    mse = F.mse_loss(rec, x).item()
    out = {"counter_exact_on_reconstructions": round(on_rec["exact"], 4),
           "counter_mae_on_reconstructions": round(on_rec["mae"], 3),
           "psnr": round(10 * math.log10(1 / max(mse, 1e-12)), 2)}
    if scenes is not None:
        from ..world.object_check import check_objects

        images = (rec.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        out["objects_pass_on_reconstructions"] = round(float(np.mean(
            [check_objects(im, s.points, s.boxes).passed for im, s in zip(images, scenes)])), 4)
        if reader is not None:
            reads = [reader.read_objects(im, s.boxes) for im, s in zip(images, scenes)]
            out["digits_kept"] = round(float(np.mean([r["digit"] == d for rs, s in zip(reads, scenes)
                                                      for r, d in zip(rs, s.digits)])), 4)
            out["legible"] = round(float(np.mean([r["legible"] for rs in reads for r in rs])), 4)
    return out


def train_latent_ae(cfg: TrainConfig, data: str, folder: Path, batch: int = 16, latent_dim: int = 144,
                    global_dim: int = 16, channels: tuple[int, ...] = (32, 64, 128),
                    dec_channels: tuple[int, ...] = (64, 32, 32),
                    test: str = "world:test:200", counter: str = DEFAULT_COUNTER, components: int = 10,
                    adversarial: float = 0.0, disc_start: int = 0, digits: str | None = DEFAULT_DIGITS) -> None:
    """``adversarial`` > 0 adds the patch-adversarial term (factory.train.adversarial) from step
    ``disc_start``: with pixel losses alone the decoder drew soft blobs in which a reader could
    not tell a 4 from a 9. ``digits`` (a digit-classifier folder, when present) adds identity and
    legibility of the reconstructed digits to the curve."""
    from ..models.counter import DensityCounter
    from .adversarial import AdversarialTerm

    log = _log(cfg.out)
    ts = load_training_set(data)
    checker = DensityCounter.from_pretrained(counter)
    reader, scenes = None, None
    if test.startswith("world:"):  # the scenes' own labels judge the reconstructions' objects and digits
        scenes = world_scenes(test)
        held_out = scenes_training_set(scenes)
        if digits and Path(digits).is_dir():
            from ..models.digit_classifier import DigitClassifier

            reader = DigitClassifier.from_pretrained(digits)
    else:
        held_out = load_training_set(test)
    adv = AdversarialTerm(adversarial, disc_start, seed=cfg.seed)
    real = counter_agreement(checker, pixels(held_out.images), held_out.counts)
    model = LatentAE(latent_dim, channels, dec_channels, global_dim=global_dim)
    log(f"latent-ae: {sum(p.numel() for p in model.parameters())} params, latent_dim {latent_dim} "
        f"({global_dim} global + {model.spatial} x {model.base} x {model.base} grid), "
        f"{len(ts)} training images; counter exact on the {len(held_out)} real test scenes: {real['exact']:.4f}"
        f"{'; adversarial weight %g from step %d' % (adversarial, disc_start) if adversarial > 0 else ''}")

    def loss_fn(rng, step):
        # No flips: a mirrored 2 is not a digit of the world, and a decoder that must also
        # draw mirrored digits spends its capacity on them.
        idx = rng.integers(len(ts), size=batch)
        x = pixels(ts.images[idx])
        rec, z = model(x)
        # The soft ink-mask term keeps thin strokes above the pixel check's line (factory.train.pixel_losses).
        rec_loss = reconstruction_loss(rec, x) + ink_mask_loss(rec, x)
        g_term, _ = adv.loss(x * 2 - 1, rec * 2 - 1, rec_loss, model.decoder[-1].weight, step)
        return rec_loss + CODE_PENALTY * (z**2).mean() + g_term

    def evaluate(step):
        return {**evaluate_reconstructions(model, checker, held_out, reader, scenes),
                "counter_exact_on_real": round(real["exact"], 4)}

    def export():
        model.eval()
        codes = encode_all(model, ts.images)
        stats = code_statistics(codes)
        prior = fit_prior(codes, components, seed=cfg.seed)
        metrics = {**evaluate_reconstructions(model, checker, held_out, reader, scenes),
                   "counter_exact_on_real": round(real["exact"], 4),
                   "test_scenes": len(held_out), "data": data, "steps": cfg.steps, "seed": cfg.seed}
        model.save_pretrained(folder, code_stats={**stats, "prior_components": components, "eval": metrics},
                              prior=prior)
        if (cfg.out / "curve.jsonl").is_file():  # every shipped folder keeps the curve that produced it
            shutil.copy(cfg.out / "curve.jsonl", folder / "curve.jsonl")
        log(f"saved {folder}: {json.dumps(metrics)}; code radius {stats['radius']:.2f}")

    train(cfg, [model], loss_fn, evaluate=evaluate, export=export, log=log,
          state=adv.checkpointed() if adversarial > 0 else ())
