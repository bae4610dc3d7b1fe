"""Carried labels: do the points a count edit carries over lie on the objects of the edited image?

Reads the shards of count-edit runs (`factory run recipes/count-edit.yaml --out OUT`,
or the same recipe with `change: -1`) and reports, over the samples kept:

  carried            share whose object labels the edit carried over (the clone editor
                     at alpha 1), and why the others were dropped
  consistent         count == number of points == boxes == digits == sizes, and the
                     density map sums to the count
  points matched     check_edit's share of carried points with an ink blob within 3 px
  new point          (additions) distance from the added object's point to the nearest
                     ink blob: median and the share within 3 / 4 / 6 px; the share of
                     added objects whose box reaches the frame (cut off), against the
                     source objects' share

and, with --baseline N, what the same point-to-blob match gives on N unedited test
scenes and on the generator's reconstructions of them (the ceiling an edit of a
reconstruction can reach).

    python benchmarks/carried_labels.py OUT [OUT ...] [--baseline 500] [--generator models/latent-ae]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.checkers import object_centres, points_matched  # noqa: E402
from factory.loaders import ShardDataset  # noqa: E402

RADII = (3.0, 4.0, 6.0)


def to_uint8(image) -> np.ndarray:
    """A loader's (3, H, W) float tensor in [0, 1] as an (H, W, 3) uint8 array."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def touches_frame(box, shape) -> bool:
    """Whether an (x0, y0, x1, y1) box reaches the edge of an (H, W, ...) image."""
    x0, y0, x1, y1 = box
    return x0 <= 0 or y0 <= 0 or x1 >= shape[1] or y1 >= shape[0]


def run_report(out: str) -> dict:
    kept = carried = consistent = 0
    dropped: collections.Counter = collections.Counter()
    matched, new_dist, density_err, at_frame, others_at_frame = [], [], [], [], []
    for s in ShardDataset(out):
        j = s["json"]
        edit = j.get("edit") or {}
        if edit.get("kind") != "count":
            continue
        kept += 1
        if not edit.get("labels_carried"):
            dropped[edit.get("labels_dropped") or "the source had no points"] += 1
            continue
        carried += 1
        n = j["count"]
        lists = [j.get(k) for k in ("points", "boxes", "digits", "sizes") if j.get(k) is not None]
        density_err.append(abs(float(s["density"].sum()) - n) if "density" in s else float("nan"))
        consistent += all(len(v) == n for v in lists) and density_err[-1] < 1e-3
        matched.append(j["checks"]["edit"]["points_matched"])
        if edit.get("change") == 1:
            image = to_uint8(s["image"])
            centres = object_centres(image)
            new = np.asarray(j["points"][-1])
            new_dist.append(float(np.linalg.norm(centres - new, axis=1).min()) if len(centres) else float("inf"))
            if j.get("boxes"):
                at_frame.append(touches_frame(j["boxes"][-1], image.shape))
                others_at_frame.append(np.mean([touches_frame(b, image.shape) for b in j["boxes"][:-1]]))
    report = {"out": out, "kept": kept, "carried": carried, "dropped": dict(dropped.most_common()),
              "consistent": consistent,
              "density_sum_error_max": round(float(np.nanmax(density_err)), 6) if density_err else None,
              "points_matched_mean": round(float(np.mean(matched)), 4) if matched else None,
              "all_points_matched": round(float(np.mean(np.array(matched) == 1.0)), 4) if matched else None}
    if new_dist:
        d = np.array(new_dist)
        report["new_point"] = {"n": len(d), "median_px": round(float(np.median(d)), 2),
                               **{f"within_{r:g}px": round(float(np.mean(d <= r)), 4) for r in RADII}}
        if at_frame:  # a copy cut off by the frame: its box reaches the image's edge
            report["new_point"]["box_at_frame"] = round(float(np.mean(at_frame)), 4)
            report["new_point"]["source_boxes_at_frame"] = round(float(np.mean(others_at_frame)), 4)
    return report


def baseline(n: int, generator: str) -> dict:
    """points_matched of the world's own points on n unedited test scenes and on the
    generator's reconstructions of them."""
    import torch

    from factory.latent.generator import load_generator
    from factory.latent.inversion import to_uint8 as tensor_to_uint8
    from factory.world.scenes import make_scene

    g = load_generator(generator)
    scenes = [make_scene("test", i) for i in range(n)]
    out = {"scenes": n}
    for name in ("real", "reconstructed"):
        images = [s.image for s in scenes]
        if name == "reconstructed":
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                images = tensor_to_uint8(torch.cat([g.synthesize(g.encode(b)) for b in x.split(100)]))
        weights = [len(s.points) for s in scenes]
        share = [points_matched(s.points, im) for s, im in zip(scenes, images)]
        out[name] = round(float(np.average(share, weights=weights)), 4)  # per point, as the edits' mean is per sample
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", nargs="+", help="output folder(s) of count-edit runs")
    ap.add_argument("--baseline", type=int, default=0, help="also match points on N unedited test scenes")
    ap.add_argument("--generator", default="models/latent-ae", help="generator for the baseline's reconstructions")
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args()
    report = {"runs": [run_report(o) for o in args.out]}
    if args.baseline:
        report["baseline"] = baseline(args.baseline, args.generator)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
