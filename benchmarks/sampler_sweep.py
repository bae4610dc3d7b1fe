"""Which sampler settings make a density ControlNet's images hold their labels?

For every combination of the given values (guidance scale, ControlNet
conditioning scale, DDIM eta, steps, the width of the condition's Gaussians),
the factory's generator stage draws N
test-pool layouts (handwriting no model trained on) and the pixel object check
(factory.world.object_check: every labelled point one whole ink blob, every
blob one point) judges each image; the trained DensityCounter's exact rate and
the share of objects the digit classifier reads as a digit (legibility) are
printed beside it. The weights stay the same: this is the sampler alone.

    python benchmarks/sampler_sweep.py --n 300 --guidance 2 --control-scale 1 2 3 --eta 0 0.5 1 \\
        [--condition-sigma 0 0.8 1.0] [--steps 20] [--start 0] [--model models/tiny-sd] [--controlnet models/tiny-controlnet] [--json out.json]

Choose settings on one range of layouts and report them on another (``--start``):
a best-of-many on the same images flatters the winner.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.evaluation.fidelity import count_images, scores  # noqa: E402
from semaug_fidelity import counters, digit_reader, generated_samples, object_report  # noqa: E402


def sweep_one(model: str, controlnet: str, setting: dict, n: int, start: int, batch: int, counter: str | None,
              reader, device: str | None) -> dict:
    ok, info = generated_samples(model, controlnet, n, setting, batch, device, start)
    images, labels = [s.image for s in ok], np.array([s.meta["count"] for s in ok])
    row = {**setting, **object_report(images, ok, reader), "failed": info["failed"], "seconds": info["seconds"]}
    if counter:
        row["density_counter_exact"] = scores(count_images(images, counter), labels)["exact"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="test-pool layouts per setting")
    ap.add_argument("--start", type=int, default=0, help="first test-pool layout")
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0], help="classifier-free guidance scales")
    ap.add_argument("--control-scale", type=float, nargs="+", default=[1.0, 2.0],
                    help="ControlNet conditioning scales")
    ap.add_argument("--eta", type=float, nargs="+", default=[0.0, 0.5], help="DDIM eta (0 deterministic, 1 DDPM-like)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20], help="DDIM steps")
    ap.add_argument("--condition-sigma", type=float, nargs="+", default=[0.0],
                    help="draw the condition from the points with Gaussians this wide, px (0: the layout's own "
                         "density map, the world's 1.5 px)")
    ap.add_argument("--model", default="models/tiny-sd", help="SD pipeline folder or hub id")
    ap.add_argument("--controlnet", default="models/tiny-controlnet", help="density ControlNet folder")
    ap.add_argument("--counter-model", default="models/counter", help="DensityCounter folder ('' to skip)")
    ap.add_argument("--digits", default="models/digit-classifier",
                    help="digit-classifier folder for legibility ('' to skip)")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    counter = counters(args.counter_model)[0].get("density_counter")
    reader = digit_reader(args.digits)
    print(f"{'guidance':>8}{'control':>8}{'eta':>6}{'steps':>6}{'sigma':>6}{'pass':>7}{'merged':>8}{'split':>7}{'extra':>7}"
          f"{'missing':>8}{'legible':>8}{'counter':>9}{'s':>6}", file=sys.stderr)
    rows = []
    for g, c, e, st, sg in itertools.product(args.guidance, args.control_scale, args.eta, args.steps,
                                             args.condition_sigma):
        setting = {"guidance": g, "control_scale": c, "eta": e, "steps": st, "condition_sigma": sg or None}
        r = sweep_one(args.model, args.controlnet, setting, args.n, args.start, args.batch, counter, reader, args.device)
        rows.append(r)
        ce = f"{r['density_counter_exact']:>9.3f}" if "density_counter_exact" in r else f"{'':>9}"
        leg = f"{r['legible']:>8.3f}" if "legible" in r else f"{'':>8}"
        print(f"{g:>8g}{c:>8g}{e:>6g}{st:>6}{sg:>6g}{r['objects_pass']:>7.3f}{r['objects_merged']:>8.3f}"
              f"{r['objects_split']:>7.3f}{r['objects_extra']:>7.3f}{r['objects_missing']:>8.3f}{leg}{ce}"
              f"{r['seconds']:>6.0f}", file=sys.stderr, flush=True)
    report = {"n": args.n, "start": args.start, "model": args.model, "controlnet": args.controlnet, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
