"""Train the ReDO mask model (``factory train redo``) on images alone: no mask is ever shown to it.

Each step, for a batch of real images and fresh codes z (one per region): the mask network
splits every image into two regions, each region generator redraws its region, giving two
composites per image (one region redrawn in each); the discriminator is updated on real
images against the composites (hinge loss), then the mask network, the generators and the
code encoder are updated to make composites it calls real and to let the encoder recover
every code from the image with both regions redrawn (``rec_weight`` x MSE; the paper's 5).

As in the paper's code, the mask network learns at a tenth of the generators' rate
(``mask_lr_scale``): the generators must first learn to draw a region before the mask has a
signal worth following, and a mask that moves fast early collapses to one region. Adam runs
with betas (0, 0.9), the paper's (and SAGAN's) choice for hinge-loss GANs.

Masks appear only in the evaluation: foreground accuracy and IoU against the renderer's
masks on test scenes, with the foreground region chosen as at export (the smaller one on
held-out training images, no labels) and, as the paper scores, the better of the two
assignments per image.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import FactoryError
from ..models.folder import CONFIG
from ..models.redo import REGIONS, CompositeDiscriminator, MaskNetwork, ReDO, read_config
from ..segmentation import foreground_scores
from ..world.digits import SPLITS
from ..world.scenes import SIZE, make_scene
from .adversarial import hinge_d_loss
from .data import load_training_set
from .diffusion import _log
from .loop import TrainConfig, train

REC_WEIGHT = 5.0
MASK_LR_SCALE = 0.1
BETAS = (0.0, 0.9)


def _world_spec(spec: str, what: str) -> tuple[str, int, int]:
    """``world:SPLIT:N[:START]`` as (split, n, start), or a FactoryError saying how to write it."""
    parts = spec.split(":")
    try:
        if parts[0] != "world" or not 3 <= len(parts) <= 4:
            raise ValueError
        split, n, start = parts[1], int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        raise FactoryError(f"{what} {spec!r} is not world:SPLIT:N[:START] (e.g. world:test:200: the test "
                           f"scenes 0..199)") from None
    if split not in SPLITS:
        raise FactoryError(f"{what} {spec!r}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if n <= 0 or start < 0:
        raise FactoryError(f"{what} {spec!r}: N must be positive and START >= 0")
    return split, n, start


def check_data(spec: str) -> int | None:
    """Refuse a --data that cannot be read before anything loads; the image side when the spec
    says it (world scenes), None when only reading the images will tell (a shard folder, FSC147)."""
    if spec.startswith("world:"):
        _world_spec(spec, "--data")
        return SIZE
    if spec.startswith("fsc147:"):
        path = spec[len("fsc147:"):].partition(":")[0]
        if not Path(path).expanduser().is_dir():
            raise FactoryError(f"--data {spec!r}: FSC147 folder {path!r} does not exist")
        return None
    if not Path(spec).expanduser().exists():
        raise FactoryError(f"--data {spec!r} is neither world:SPLIT:N[:START] (reference-world scenes), "
                           f"fsc147:PATH[:SPLIT], nor an existing shard folder")
    return None


def check_export(folder: Path) -> None:
    """The export folder is new or holds a mask model: never overwrite a model of another kind."""
    cfg = Path(folder) / CONFIG
    if cfg.is_file():
        try:
            read_config(folder)
        except FactoryError:
            raise FactoryError(f"--export {folder} already holds another model ({CONFIG} is not a redo-mask "
                               f"model's); choose another folder, e.g. --export models/redo") from None


def world_scenes(spec: str) -> list:
    """``world:SPLIT:N[:START]`` as scenes with their exact masks (for the evaluation only)."""
    split, n, start = _world_spec(spec, "ReDO is evaluated on reference-world scenes, whose masks are exact:")
    return [make_scene(split, i) for i in range(start, start + n)]


def eval_set(scenes: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The scenes' images (N, size, size, 3) uint8 and exact foregrounds (N, size, size) bool, resized
    (area for the pixels, nearest for the mask) when the model works at another side than the world's."""
    if size == scenes[0].image.shape[0]:
        return np.stack([s.image for s in scenes]), np.stack([s.mask > 0 for s in scenes])
    from PIL import Image

    images = [np.asarray(Image.fromarray(s.image).resize((size, size), Image.BOX)) for s in scenes]
    masks = [np.asarray(Image.fromarray((s.mask > 0).astype(np.uint8)).resize((size, size), Image.NEAREST)) > 0
             for s in scenes]
    return np.stack(images), np.stack(masks)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def foreground_region(model: ReDO, images: np.ndarray) -> int:
    """The region that covers less of these images: objects are smaller than their background."""
    with torch.no_grad():
        share0 = float(torch.sigmoid(model.mask(_pixels(images))).mean())
    return 0 if share0 <= 0.5 else 1


def mask_scores(model: ReDO, images: np.ndarray, truth: np.ndarray, region: int, threshold: float = 0.5) -> dict:
    """Foreground accuracy/IoU of ``region`` against the exact foregrounds ``truth``, and the paper's
    score (the better of the two assignments per image); ``smaller_region``: the smaller region's share
    of the image (near 0 means the masks collapsed to one region)."""
    with torch.no_grad():
        p0 = torch.sigmoid(model.mask(_pixels(images))).numpy()
    fixed = (p0 >= threshold) if region == 0 else (p0 < threshold)
    ours = foreground_scores(fixed, truth)
    a = foreground_scores(p0 >= threshold, truth)
    b = foreground_scores(p0 < threshold, truth)
    # per image: the assignment with the better IoU (the paper's evaluate() takes the max of each)
    per_a = _per_image_iou(p0 >= threshold, truth)
    per_b = _per_image_iou(p0 < threshold, truth)
    acc_a = ((p0 >= threshold) == truth).mean((1, 2))
    return {"accuracy": ours["accuracy"], "iou": ours["iou"], "foreground_region": region,
            "paper_accuracy": round(float(np.maximum(acc_a, 1 - acc_a).mean()), 4),
            "paper_iou": round(float(np.maximum(per_a, per_b).mean()), 4),
            "smaller_region": round(float(min(a["foreground_share"], b["foreground_share"])), 4)}


def _per_image_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    union = (pred | truth).sum((1, 2))
    return np.where(union > 0, (pred & truth).sum((1, 2)) / np.maximum(union, 1), 1.0)


def train_redo(cfg: TrainConfig, data: str, folder: Path, batch: int = 16, test: str = "world:test:200",
               held_out: str = "world:train:256:900000", z_dim: int = 16, channels=(16, 32, 64),
               rec_weight: float = REC_WEIGHT, mask_lr_scale: float = MASK_LR_SCALE,
               init: str | Path | None = None) -> None:
    """Train ReDO on ``data`` and write the mask network to ``folder``. ``init``: a mask-model folder
    whose mask network starts the run (its channels are kept; the generators start fresh). Every
    input is checked before any image is read or model loaded."""
    side = check_data(data)
    _world_spec(test, "the evaluation scenes")
    if held_out:
        _world_spec(held_out, "the held-out scenes")
    check_export(folder)
    init_cfg = None
    if init is not None:
        init_cfg = read_config(Path(init).expanduser())
        channels = tuple(init_cfg["channels"])
        if side is not None and init_cfg["image_size"] != side:
            raise FactoryError(_init_size(init, init_cfg["image_size"], side, data))
    log = _log(cfg.out)
    torch.manual_seed(cfg.seed)
    ts = load_training_set(data)
    size = ts.images.shape[1]
    if ts.images.shape[2] != size:
        raise FactoryError(f"ReDO trains on square images; {data!r} has {ts.images.shape[2]}x{size}: resize them first")
    if size % 4:
        raise FactoryError(f"ReDO's mask network halves the image twice: {data!r} has {size}x{size} images, "
                           f"resize them to a side divisible by 4 first")
    if init_cfg is not None and init_cfg["image_size"] != size:
        raise FactoryError(_init_size(init, init_cfg["image_size"], size, data))
    test_images, test_truth = eval_set(world_scenes(test), size)
    held = eval_set(world_scenes(held_out), size)[0] if held_out else ts.images[:256]
    model = ReDO(size, channels, z_dim)
    if init is not None:
        model.mask.load_state_dict(MaskNetwork.from_pretrained(Path(init).expanduser()).state_dict())
        log(f"redo: mask network from {init}")
    model.mask.lr_scale = mask_lr_scale
    disc = CompositeDiscriminator()
    cfg.extra.setdefault("betas", BETAS)
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=BETAS)
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("mask", model.mask), ("generators", model.generators), ("encoder", model.encoder), ("disc", disc))}
    log(f"redo: params {n_params}, {len(ts)} training images ({size}x{size}), batch {batch}, "
        f"code {z_dim} per region, reconstruction weight {rec_weight}, mask lr x{mask_lr_scale}")
    stats: dict[str, list[float]] = {"d_loss": [], "g_adv": [], "rec": []}

    def loss_fn(rng, step):
        x = _pixels(ts.images[rng.integers(len(ts), size=batch)])
        real = _pixels(ts.images[rng.integers(len(ts), size=batch)])
        z = torch.from_numpy(rng.standard_normal((batch, REGIONS, z_dim)).astype(np.float32))
        _, composites, redrawn = model.redraw(x, z)
        fakes = composites.flatten(0, 1)
        # The discriminator's step, on the composites as they are now (no gradient to the others).
        disc.requires_grad_(True)
        d_opt.zero_grad(set_to_none=True)
        d_loss = hinge_d_loss(disc(real), disc(fakes.detach()))
        d_loss.backward()
        d_opt.step()
        disc.requires_grad_(False)
        g_adv = -disc(fakes).mean()
        rec = ((model.encoder(redrawn) - z) ** 2).mean()
        for k, v in (("d_loss", d_loss), ("g_adv", g_adv), ("rec", rec)):
            stats[k].append(float(v.detach()))
        return g_adv + rec_weight * rec

    def evaluate(step):
        region = foreground_region(model, held)
        row = mask_scores(model, test_images, test_truth, region)
        row.update({k: round(float(np.mean(v[-cfg.eval_every:])), 4) for k, v in stats.items() if v})
        return row

    def export():
        model.eval()
        region = foreground_region(model, held)
        scores = mask_scores(model, test_images, test_truth, region)
        mask = model.mask
        mask.config.update(foreground_region=region, evaluation={**scores, "test": test},
                           training={"data": data, "steps": cfg.steps, "seed": cfg.seed, "batch": batch,
                                     "z_dim": z_dim, "rec_weight": rec_weight, "mask_lr_scale": mask_lr_scale,
                                     "init": str(init) if init else None})
        mask.save_pretrained(folder)
        if (cfg.out / "curve.jsonl").is_file():
            shutil.copy(cfg.out / "curve.jsonl", Path(folder) / "curve.jsonl")
        log(f"saved {folder}: foreground region {region}, on {test}: {scores}")

    train(cfg, [model.mask, model.generators, model.encoder], loss_fn, evaluate=evaluate, export=export, log=log,
          state=[disc, d_opt])


def _init_size(init, model_size: int, size: int, data: str) -> str:
    return (f"--init {init} is a mask model of {model_size}x{model_size} images but --data {data!r} has "
            f"{size}x{size} images: start fresh (drop --init) or give a mask model trained on {size}x{size} images")
