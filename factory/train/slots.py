"""Train the object-slot scene model (``factory train slots``; :mod:`factory.models.slots`) on images
alone: no count, box or mask is shown to it.

Each step: the ELBO of a batch (Gaussian likelihood, KL terms, the object-prior loss) with the
presence relaxed at a temperature annealed from ``TAU`` to ``TAU_END`` over the first half of
training, as SPACE does (a hot start lets every cell try to explain what it sees; a cold end
makes presence nearly 0/1 before it is thresholded at inference).

The curve is the paper's measure of a decomposition, on test scenes whose truth the renderer
knows: the count error rate (share of scenes whose number of present slots differs from the
label), the mean box IoU of the labelled objects (each matched one to one to a present slot's
drawn box; an unmatched object scores 0), and the pixel object check on the reconstructions.

At export, the learned prior over layouts (:class:`factory.models.slots.LayoutPrior`) is
fitted on the codes of ``prior_n`` encoded training scenes, so the folder can also draw new
scenes (``sample_latent``).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from ..models.slots import LayoutPrior, SlotSceneModel, box_iou
from .data import load_training_set, world_scenes
from .diffusion import _log
from .latent import pixels
from .loop import TrainConfig, train

TAU, TAU_END = 2.5, 0.5
PRIOR_PRES = 0.05  # the Bernoulli prior of presence: few cells hold an object (the world: 6.5 of 64 on average)
OBJECT_PRIOR = 20.0  # weight of the object-prior loss on the drawn alpha, in the ELBO's nats
BORDER_WEIGHT = 2.0  # weight of the image's ink on glimpse borders (already in the likelihood's nats)


def match_boxes(pred: list, truth: list) -> list[float]:
    """IoU of each true box with the predicted box matched to it one to one (Hungarian, by IoU);
    0 for a true box left unmatched."""
    from scipy.optimize import linear_sum_assignment

    if not truth:
        return []
    if not pred:
        return [0.0] * len(truth)
    iou = np.array([[box_iou(t, p) for p in pred] for t in truth])
    rows, cols = linear_sum_assignment(-iou)
    out = [0.0] * len(truth)
    for r, c in zip(rows, cols):
        out[r] = float(iou[r, c])
    return out


def encode_all(model: SlotSceneModel, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Codes of uint8 images (n, H, W, 3)."""
    with torch.no_grad():
        return torch.cat([model.encode(pixels(images[i:i + chunk])) for i in range(0, len(images), chunk)])


def decompose(model: SlotSceneModel, images: np.ndarray, chunk: int = 64):
    """Codes, present slots' boxes and reconstructions of uint8 images (n, H, W, 3)."""
    z = encode_all(model, images, chunk)
    boxes, recs = [], []
    with torch.no_grad():
        for i in range(0, len(z), chunk):
            _, pres, where, what = model.layout.split(z[i:i + chunk])
            b = model.object_boxes(pres, where, what)
            recs.append(model.synthesize(z[i:i + chunk]))
            boxes += [[bb[s].tolist() for s in range(len(p)) if p[s] > 0] for bb, p in zip(b, pres)]
    return z, boxes, torch.cat(recs)


def evaluate_decompositions(model: SlotSceneModel, scenes: list) -> dict:
    """Count error rate, box IoU and the pixel object check of reconstructions, on world scenes."""
    from ..world.object_check import check_objects

    images = np.stack([s.image for s in scenes])
    z, boxes, rec = decompose(model, images)
    counts = np.array([len(b) for b in boxes])
    truth = np.array([s.count for s in scenes])
    ious = [v for b, s in zip(boxes, scenes) for v in match_boxes(b, s.boxes)]
    mse = float(((rec - pixels(images)) ** 2).mean())
    rec8 = (rec.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    per_count = {}
    for c in sorted(set(truth.tolist())):
        per_count[str(c)] = round(float(np.mean(counts[truth == c] != c)), 3)
    return {"count_error_rate": round(float(np.mean(counts != truth)), 4),
            "count_mae": round(float(np.mean(np.abs(counts - truth))), 3),
            "box_iou": round(float(np.mean(ious)), 4),
            "box_iou_50": round(float(np.mean(np.array(ious) > 0.5)), 4),
            "objects_pass_on_reconstructions": round(float(np.mean(
                [check_objects(im, s.points, s.boxes).passed for im, s in zip(rec8, scenes)])), 4),
            "psnr": round(10 * math.log10(1 / max(mse, 1e-12)), 2),
            "count_error_by_count": per_count}


def fit_layout_prior(model: SlotSceneModel, images: np.ndarray, steps: int, seed: int, log=print) -> LayoutPrior:
    """The learned prior over layouts, fitted by maximum likelihood on encoded training scenes."""
    z = encode_all(model, images)
    bg, pres, where, what = model.layout.split(z)
    where, what = where * pres[..., None], what * pres[..., None]  # absent slots zeroed, as sample() draws them
    prior = LayoutPrior(model.grid, model.K, model.what_dim, model.bg_dim)
    prior.fit_scene(bg, pres, what)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    # The last tenth is held out; the prior kept is the one with the lowest held-out NLL (on
    # 4,500 scenes it overfit after 1,000 steps: held out 29.4 then, 35.2 at 2,000, 18.8 on its train).
    held = max(1, len(z) // 10)
    best, best_state = float("inf"), None
    for step in range(1, steps + 1):
        idx = torch.randint(len(z) - held, (128,), generator=gen)
        loss = prior.nll(bg[idx], pres[idx], where[idx], what[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                val = float(prior.nll(bg[-held:], pres[-held:], where[-held:], what[-held:]))
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in prior.state_dict().items()}
            if step % 500 == 0 or step == steps:
                log(f"layout prior step {step}/{steps}: nll {float(loss.detach()):.2f} train, {val:.2f} held out "
                    f"(best {best:.2f})")
    prior.load_state_dict(best_state)
    return prior.eval()


def train_slots(cfg: TrainConfig, data: str, folder: Path, batch: int = 16, test: str = "world:test:200",
                prior_n: int = 20000, prior_steps: int = 2000) -> None:
    log = _log(cfg.out)
    ts = load_training_set(data)
    scenes = world_scenes(test)
    model = SlotSceneModel()
    log(f"slots: {sum(p.numel() for p in model.parameters())} params, {model.layout.n_slots} slots "
        f"({model.grid}x{model.grid} cells, K={model.K}), code of {model.layout.latent_dim} numbers; "
        f"{len(ts)} training images")
    half = max(1, cfg.steps // 2)

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x = pixels(ts.images[idx])
        tau = TAU_END + (TAU - TAU_END) * max(0.0, 1 - step / half)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        t = model.elbo_terms(x, tau, PRIOR_PRES, gen)
        loss = (t["nll"] + t["kl_pres"] + t["kl_where"] + t["kl_what"] + t["kl_bg"] + OBJECT_PRIOR * t["object_prior"]
                + BORDER_WEIGHT * t["border"])
        return loss / x[0].numel()  # per pixel value: the scale the loop's log and clipping expect

    def evaluate(step):
        return evaluate_decompositions(model, scenes)

    def export():
        model.eval()
        prior = fit_layout_prior(model, ts.images[:prior_n], prior_steps, cfg.seed, log)
        metrics = {**evaluate_decompositions(model, scenes), "test_scenes": len(scenes), "data": data,
                   "steps": cfg.steps, "seed": cfg.seed}
        model.save_pretrained(folder, {"eval": metrics}, prior)
        if (cfg.out / "curve.jsonl").is_file():
            shutil.copy(cfg.out / "curve.jsonl", folder / "curve.jsonl")
        log(f"saved {folder}: {json.dumps(metrics)}")

    train(cfg, [model], loss_fn, evaluate=evaluate, export=export, log=log)
