"""The object-slot scene model measured against the world's truth (issue 17, part 2).

1. Decompositions of real test scenes (the encoder, presence thresholded, duplicates removed):
   the count error rate (share of scenes whose number of present slots is not the label's: the
   SPACE paper's metric), its MAE, and the box IoU of each labelled object with the present slot
   matched to it one to one (an unmatched object scores 0), on two disjoint sets of test scenes.
2. Count edits (+1) on 256 inverted real test scenes, per source count 1-11, from the outputs of
   two runs: `editor: slot` on this model and `editor: clone` on the latent-ae. For each: the
   edits the learned checks kept, the share of those the pixel object check passes (each object
   one whole ink blob), and the yield (kept / attempted); see benchmarks/count_edit_pixels.py.

    factory run recipes/slot-count-edit.yaml --out out/slot-count-edit
    factory run recipes/count-edit.yaml --out out/count-edit
    python benchmarks/slot_scenes.py --edits out/slot-count-edit --baseline out/count-edit
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def decompositions(model_ref: str, n: int, starts: list[int]) -> dict:
    from factory.models.slots import SlotSceneModel
    from factory.train.slots import evaluate_decompositions
    from factory.world import make_scene

    model = SlotSceneModel.from_pretrained(model_ref)
    out = {}
    for start in starts:
        scenes = [make_scene("test", i) for i in range(start, start + n)]
        out[f"test:{start}..{start + n - 1}"] = evaluate_decompositions(model, scenes)
    return out


def prior_samples(model_ref: str, n: int) -> dict:
    """Scenes drawn from the learned layout prior: their counts, and whether the pixels show the
    objects the code lists (the pixel object check against the slots' own boxes and centres)."""
    import numpy as np
    import torch

    from factory.latent.generator import load_generator
    from factory.world.object_check import check_objects

    g = load_generator(model_ref)
    z = torch.from_numpy(g.sample_latents(list(range(n))))
    with torch.no_grad():
        images = (g.synthesize(z) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    _, pres, where, what = g.layout.split(z)
    boxes = g.model.object_boxes(pres, where, what)
    counts = (pres > 0.5).sum(1).numpy()
    passed = []
    for im, b, p in zip(images, boxes, pres):
        objs = [bb.tolist() for bb, on in zip(b, p) if on > 0.5 and bb[2] > bb[0]]
        pts = [[(x0 + x1) / 2, (y0 + y1) / 2] for x0, y0, x1, y1 in objs]
        passed.append(bool(objs) and check_objects(im, pts, objs).passed)
    return {"n": n, "mean_count": round(float(counts.mean()), 2),
            "share_count_1_12": round(float(np.mean((counts >= 1) & (counts <= 12))), 4),
            "objects_pass": round(float(np.mean(passed)), 4)}


def edits(folder: str) -> dict:
    from count_edit_pixels import tally

    return tally(Path(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/slots", help="slot scene model folder")
    ap.add_argument("--n", type=int, default=1000, help="test scenes per decomposition set")
    ap.add_argument("--starts", type=int, nargs="+", default=[0, 500000],
                    help="first test-scene index of each set (disjoint sets: two measurements, not one)")
    ap.add_argument("--edits", help="output of `factory run recipes/slot-count-edit.yaml`")
    ap.add_argument("--baseline", help="output of `factory run recipes/count-edit.yaml` (clone editor, latent-ae)")
    ap.add_argument("--prior", type=int, default=500, help="scenes drawn from the layout prior (0: none)")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    report = {"decompositions": decompositions(args.model, args.n, args.starts)}
    for name, d in report["decompositions"].items():
        print(f"{name}: count error rate {d['count_error_rate']:.3f} (MAE {d['count_mae']:.2f}), box IoU "
              f"{d['box_iou']:.3f} (IoU>0.5: {d['box_iou_50']:.3f}), pixel check on reconstructions "
              f"{d['objects_pass_on_reconstructions']:.3f}, PSNR {d['psnr']:.1f}", file=sys.stderr)
        print("  count error by count: " + ", ".join(f"{k}: {v:.2f}" for k, v in d["count_error_by_count"].items()),
              file=sys.stderr)
    if args.prior:
        p = report["prior_samples"] = prior_samples(args.model, args.prior)
        print(f"{p['n']} scenes from the layout prior: mean count {p['mean_count']}, counts in 1-12: "
              f"{p['share_count_1_12']:.3f}, pixel check against the code's own objects: {p['objects_pass']:.3f}",
              file=sys.stderr)
    for key, folder in (("slot", args.edits), ("clone", args.baseline)):
        if not folder:
            continue
        from count_edit_pixels import print_table

        report[f"edits_{key}"] = edits(folder)
        print(f"\n{key} editor ({folder}):", file=sys.stderr)
        print_table(report[f"edits_{key}"])
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
