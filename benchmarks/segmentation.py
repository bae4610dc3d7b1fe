"""Object masks as labels: how close are a mask model's masks to the renderer's exact ones?

Measures a mask model (ReDO, ``factory train redo``, or the object-slot model, ``models/slots``,
whose objects' alphas are its foreground; the folder is the argument, or ``pixel``
for the model-free rule alone) the way the `segment` stage uses it: the foreground where
the model's probability is >= --threshold, split into instances at the labelled points
(factory.segmentation.split_instances). Beside it, always, the model-free reference
``pixel`` (ink is what lies far from the border's colour: the pixel counter's rule, which
the reference world is built to satisfy), so a learned mask is read against it.

On N real test scenes (world:test, scenes START..START+N-1), against the exact masks:

  accuracy, iou          ReDO's measures: pixel accuracy and IoU of the foreground, mean
                         over images (the paper reports 0.917 / 0.781 on LFW)
  paper_acc, paper_iou   the same with the better of the two region assignments per image,
                         as the paper's evaluation scores (equal to the above when the
                         exported foreground region is the right one)
  inst_iou, inst_iou50   per-object IoU after the point split: mean over objects, and the
                         share of objects with IoU >= 0.5
  empty                  share of labelled objects that got no mask pixel

With --shards OUT (a factory output folder, e.g. a SemAug run's), on the samples with points
and of the model's image size, the masks' agreement with the labelled points:

  found                  share of labelled points whose object got mask pixels (the point
                         lies within 6 px of the foreground)
  on_mask                share of points whose own pixel is foreground
  all_found              share of samples in which every object got pixels (what the stage's
                         filter_empty keeps)
  unclaimed              share of the foreground no labelled point claims (foreground beyond
                         4 px of every object: an unlabelled object, or noise)
  mask_iou, inst_iou     against the sample's own mask, where it carries one (renders and
                         augments keep the exact one; generated images have none)

Prints a table; --json writes the report.

    python benchmarks/segmentation.py models/redo [--n 500] [--start 0] [--threshold 0.5] \\
        [--shards OUT] [--limit 2000] [--json report.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.errors import FactoryError  # noqa: E402
from factory.segmentation import (border_colour_foreground, foreground_scores, instance_ious,  # noqa: E402
                                  split_instances)
from factory.world.scenes import make_scene  # noqa: E402

PIXEL = "pixel"
BATCH = 100


class Arm:
    """A foreground predictor: uint8 (H, W, 3) images -> float32 (H, W) probabilities."""

    def __init__(self, model: str, device: str = "cpu", net=None):
        self.name = model
        self.net = net
        self.size = None if net is None else net.image_size
        if model != PIXEL and net is None:
            from factory.segmentation import load_mask_model

            if not Path(model).is_dir():
                raise FactoryError(f"mask-model folder {model} does not exist: train one with "
                                   f"`factory train redo --out runs/redo --export {model}`, give the object-slot "
                                   f"model (models/slots), or pass 'pixel'")

            self.net = load_mask_model(model, device)
            self.size = self.net.image_size
        self.seconds = 0.0
        self.images = 0

    def foreground(self, images: list[np.ndarray]) -> list[np.ndarray]:
        t = time.perf_counter()
        if self.net is None:
            out = [border_colour_foreground(im) for im in images]
        else:
            out = [p for i in range(0, len(images), BATCH)
                   for p in self.net.foreground(np.stack(images[i: i + BATCH]))]
        self.seconds += time.perf_counter() - t
        self.images += len(images)
        return out

    def describe(self) -> dict:
        if self.net is None:
            return {"model": PIXEL}
        cfg = self.net.config
        return {"model": self.name, "kind": cfg["kind"], "image_size": cfg["image_size"],
                **({"arch": cfg["arch"]} if "arch" in cfg else {}), "training": cfg.get("training", {}),
                "evaluation_at_export": cfg.get("evaluation", getattr(self.net, "meta", {}).get("eval", {}))}


def _per_image(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float, float]:
    """accuracy, IoU, and both with the better of the two assignments (pred or its complement)."""
    acc = float((pred == truth).mean())
    inter, union = (pred & truth).sum(), (pred | truth).sum()
    iou = float(inter / union) if union else 1.0
    inv = ~pred
    inv_union = (inv | truth).sum()
    inv_iou = float((inv & truth).sum() / inv_union) if inv_union else 1.0
    return acc, iou, max(acc, 1 - acc), max(iou, inv_iou)


def score_scenes(arm: Arm, scenes: list, threshold: float) -> dict:
    """Foreground and per-object scores of one arm against the scenes' exact masks."""
    probs = arm.foreground([s.image for s in scenes])
    pred = np.stack([p >= threshold for p in probs])
    truth = np.stack([s.mask > 0 for s in scenes])
    per = np.array([_per_image(p, t) for p, t in zip(pred, truth)])
    objects = []
    for s, p, fg in zip(scenes, probs, pred):
        objects += instance_ious(split_instances(fg, s.points, p), s.mask, s.count)
    objects = np.array(objects)
    fg = foreground_scores(pred, truth)
    return {"n": len(scenes), "accuracy": fg["accuracy"], "iou": fg["iou"],
            "paper_acc": round(float(per[:, 2].mean()), 4), "paper_iou": round(float(per[:, 3].mean()), 4),
            "inst_iou": round(float(objects.mean()), 4), "inst_iou50": round(float((objects >= 0.5).mean()), 4),
            "empty": round(float((objects == 0).mean()), 4), "foreground_share": fg["foreground_share"],
            "true_share": round(float(truth.mean()), 4), "objects": len(objects)}


def _to_uint8(image) -> np.ndarray:
    """A loader's (3, H, W) float tensor in [0, 1] as an (H, W, 3) uint8 array."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def read_shards(folder: str, limit: int | None, size: int | None) -> tuple[list[dict], dict]:
    """Samples with points (and of ``size`` when given) as dicts of image, points, mask; why others were skipped."""
    from factory.loaders import ShardDataset

    kept, skipped = [], collections.Counter()
    for s in ShardDataset(folder, decode_density=False):
        if limit and len(kept) + sum(skipped.values()) >= limit:
            break
        points = s["json"].get("points")
        image = _to_uint8(s["image"])
        if not points:
            skipped["no points"] += 1
        elif size is not None and image.shape[:2] != (size, size):
            skipped[f"{image.shape[1]}x{image.shape[0]}, not the model's {size}x{size}"] += 1
        else:
            kept.append({"image": image, "points": [list(map(float, p)) for p in points],
                         "mask": s["mask"].numpy() if "mask" in s else None})
    return kept, dict(skipped)


def score_shards(arm: Arm, samples: list[dict], threshold: float) -> dict:
    """Agreement of one arm's masks with the labelled points (and the sample's own mask where it has one)."""
    probs = arm.foreground([s["image"] for s in samples])
    found, on_mask, all_found, unclaimed, with_mask, inst = [], [], [], [], [], []
    for s, p in zip(samples, probs):
        fg = p >= threshold
        ids = split_instances(fg, s["points"], p)
        n = len(s["points"])
        got = [bool((ids == i).any()) for i in range(1, n + 1)]
        found += got
        all_found.append(all(got))
        h, w = fg.shape
        on_mask += [bool(fg[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]) for x, y in s["points"]]
        if fg.any():
            unclaimed.append(float((fg & (ids == 0)).sum() / fg.sum()))
        if s["mask"] is not None:
            with_mask.append(_per_image(fg, s["mask"] > 0)[1])
            inst += instance_ious(ids, s["mask"], n)
    row = {"n": len(samples), "points": len(found),
           "found": round(float(np.mean(found)), 4) if found else None,
           "on_mask": round(float(np.mean(on_mask)), 4) if on_mask else None,
           "all_found": round(float(np.mean(all_found)), 4) if all_found else None,
           "unclaimed": round(float(np.mean(unclaimed)), 4) if unclaimed else None,
           "with_mask": len(with_mask)}
    if with_mask:
        row.update(mask_iou=round(float(np.mean(with_mask)), 4), inst_iou=round(float(np.mean(inst)), 4))
    return row


def _cells(row: dict, cols: tuple[str, ...]) -> list[str]:
    return ["" if row.get(c) is None else f"{row[c]:.1f}" if c == "images_per_s" else
            f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols]


def _table(title: str, arms: dict, cols: tuple[str, ...]) -> None:
    print(f"\n{title}")
    print("| mask | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for name, r in arms.items():
        print(f"| {name} | " + " | ".join(_cells(r, cols)) + " |")


def print_table(report: dict) -> None:
    _table(f"real test scenes {report['scenes']} (threshold {report['threshold']}), against the exact masks",
           report["real"], ("n", "accuracy", "iou", "paper_acc", "paper_iou", "inst_iou", "inst_iou50", "empty",
                            "images_per_s"))
    if "shards" in report:
        sh = report["shards"]
        _table(f"shards {sh['folder']}: {sh['read']} samples read, skipped {sh['skipped'] or 'none'}", sh["arms"],
               ("n", "points", "found", "on_mask", "all_found", "unclaimed", "with_mask", "mask_iou", "inst_iou"))


def _untrained(arm: Arm) -> Arm:
    """A ReDO mask network of ``arm``'s config with fresh weights (seed 0): the control for training."""
    import torch

    from factory.models.redo import KIND, MaskNetwork

    cfg = getattr(arm.net, "config", {})
    if cfg.get("kind") != KIND:
        raise FactoryError(f"--untrained needs a ReDO mask model (kind {KIND}); {arm.name} is not one")
    torch.manual_seed(0)
    net = MaskNetwork(cfg["image_size"], tuple(cfg["channels"]), cfg["arch"]).eval()
    return Arm(f"untrained {cfg['arch']} net, seed 0", net=net)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model", help="mask-model folder (`factory train redo`, e.g. models/redo; or the object-slot "
                    "model, models/slots), or 'pixel'")
    ap.add_argument("--n", type=int, default=500, help="real test scenes")
    ap.add_argument("--start", type=int, default=0, help="first test scene")
    ap.add_argument("--threshold", type=float, default=0.5, help="foreground probability cut (the stage's default)")
    ap.add_argument("--shards", help="a factory output folder whose samples' labelled points the masks are checked "
                    "against (e.g. a SemAug run's)")
    ap.add_argument("--limit", type=int, default=None, help="read at most this many samples of --shards")
    ap.add_argument("--untrained", action="store_true",
                    help="ReDO models: also score a freshly initialised mask network of the same config under the "
                    "same per-image split rule (what training adds beyond the architecture and the rule)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (on a busy CPU, fewer are faster)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    if args.n <= 0 or args.start < 0 or not 0 < args.threshold < 1:
        _fail("--n must be positive, --start >= 0 and --threshold in (0, 1)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        arms = [Arm(args.model, args.device)] + ([Arm(PIXEL)] if args.model != PIXEL else [])
        if args.untrained:
            arms.insert(1, _untrained(arms[0]))
        if args.shards and not Path(args.shards).exists():
            raise FactoryError(f"--shards {args.shards} does not exist")
    except FactoryError as e:
        _fail(str(e))

    scenes = [make_scene("test", i) for i in range(args.start, args.start + args.n)]
    report = {"model": arms[0].describe(), "threshold": args.threshold,
              "scenes": f"world:test:{args.n}:{args.start}", "real": {}}
    for arm in arms:
        arm.seconds = arm.images = 0
        report["real"][arm.name] = score_scenes(arm, scenes, args.threshold)
        report["real"][arm.name]["images_per_s"] = round(arm.images / max(arm.seconds, 1e-9), 1)
    if args.shards:
        samples, skipped = read_shards(args.shards, args.limit, arms[0].size)
        report["shards"] = {"folder": args.shards, "read": len(samples) + sum(skipped.values()), "skipped": skipped,
                            "arms": {arm.name: score_shards(arm, samples, args.threshold) for arm in arms}
                            if samples else {}}
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
