"""Precision of the calibrated continuous controls (Plumerault et al., ICLR 2020), on the latent-ae.

For each factor (x_shift, y_shift, zoom, brightness) and each requested change t on a grid, edit
held-out prior codes by t and measure the factor from the pixels (ink barycentre, ink linear size,
mean brightness) before and after: the mean and the spread (std) of the measured change at each
t, the paper's measure of precision. Methods:

    calibrated   u from warm-started trajectories (Algorithm 1), calibrated step g^-1(g(p) + t) - p
    naive        a linear direction without calibration: z + t*w, w the least-squares fit of the
                 code differences on t (the same trajectories)
    no-warm      as calibrated, but every trajectory target inverted from z0 (no warm start)
    refined      the edit stage's default: calibrated, then refined by warm-started inversion
                 (`refine` Adam steps a stage; run on the first --refine-codes codes)
    pixels       the pixel transform itself, measured the same way (the floor of the measure:
                 ink leaving the frame, interpolated edges)

    python benchmarks/continuous_controls.py [--trajectories 32] [--codes 32] [--refine-codes 16]
        [--factors x_shift,y_shift,zoom,brightness] [--json out/continuous_controls.json] [--threads 2]

The JSON is rewritten after each factor, so a cut-short run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.latent.editors import continuous as C  # noqa: E402
from factory.latent.generator import load_generator  # noqa: E402

GRIDS = {"x_shift": [-6, -4, -2, 2, 4, 6], "y_shift": [-6, -4, -2, 2, 4, 6], "zoom": [0.8, 0.9, 1.1, 1.2],
         "brightness": [-0.15, -0.1, -0.05, 0.05, 0.1, 0.15]}
METHODS = ("calibrated", "naive", "no-warm", "refined", "pixels")


class Fitted:
    """An artefact-shaped holder of one fit (what shift_codes reads)."""

    def __init__(self, factor, tensors, stats, hyper):
        self.tensors, self.stats = tensors, stats
        self.spec = {"factor": factor, "hyper": {**C.HYPER, **hyper}}


def fit(g, factor: str, n: int, iters: int, warm: bool, seed: int) -> Fitted:
    f = C.FACTORS[factor]
    hyper = {"trajectories": n, "iters": iters, "warm": float(warm)}
    tr = C.trajectories(g, factor, n, float(f.internal(f.span)), C.HYPER["steps"], iters, C.HYPER["lr"],
                        C.HYPER["sigma"], warm, seed)
    tensors, stats = C.fit_trajectories(tr, factor, hyper, f.span)
    return Fitted(factor, tensors, stats, hyper)


def measured(g, factor: str, z: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return C.factor_value(factor, C.measure(g.synthesize(z)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", default=str(ROOT / "models" / "latent-ae"))
    ap.add_argument("--factors", default="x_shift,y_shift,zoom,brightness")
    ap.add_argument("--trajectories", type=int, default=32)
    ap.add_argument("--iters", type=int, default=C.HYPER["iters"])
    ap.add_argument("--codes", type=int, default=32, help="held-out prior codes edited at each t")
    ap.add_argument("--refine-codes", type=int, default=16)
    ap.add_argument("--refine", type=int, default=20, help="Adam steps per stage of the refining inversion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "out" / "continuous_controls.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = load_generator(args.generator)
    z = torch.from_numpy(g.sample_latents(list(range(10_000, 10_000 + args.codes))))
    out = {"args": vars(args), "factors": {}}
    rows = []
    for factor in args.factors.split(","):
        f = C.FACTORS[factor]
        t0 = time.perf_counter()
        warm = fit(g, factor, args.trajectories, args.iters, True, args.seed)
        cold = fit(g, factor, args.trajectories, args.iters, False, args.seed)
        fit_s = time.perf_counter() - t0
        with torch.no_grad():
            x = g.synthesize(z)
        before = C.factor_value(factor, C.measure(x))
        res = {m: {} for m in METHODS}
        for amount in GRIDS[factor]:
            dt = float(f.internal(amount))
            edits = {
                "calibrated": C.shift_codes(warm, z, dt)[0],
                "naive": z + dt * warm.tensors["naive"],
                "no-warm": C.shift_codes(cold, z, dt)[0],
            }
            k = args.refine_codes
            edits["refined"] = C.refine_codes(g, z[:k], edits["calibrated"][:k], factor, dt,
                                              C.refine_stages(warm, dt), args.refine)[0]
            for m, zz in edits.items():
                change = f.physical(measured(g, factor, zz) - before[: len(zz)])
                res[m][str(amount)] = change
            res["pixels"][str(amount)] = f.physical(
                C.factor_value(factor, C.measure(*C.transform(x, factor, dt))) - before)
        summary = {}
        for m in METHODS:
            per = {a: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for a, v in res[m].items()}
            summary[m] = {"per_t": per, "mean_std": float(np.mean([p["std"] for p in per.values()])),
                          "mean_abs_bias": float(np.mean([abs(p["mean"] - float(a)) for a, p in per.items()]))}
            rows.append((factor, m, summary[m]))
        out["factors"][factor] = {"unit": f.unit, "fit_seconds": round(fit_s, 1), "methods": summary,
                                  "fit_stats": {"warm": _small(warm.stats), "no-warm": _small(cold.stats)}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"{factor}: fitted in {fit_s:.0f} s", flush=True)
    print_table(rows, out)
    return 0


def _small(stats: dict) -> dict:
    keep = ("trajectories", "kept", "explained", "final_mse_median", "residual_rms", "dt_rms", "trajectory_seconds")
    return {k: stats[k] for k in keep}


def print_table(rows, out) -> None:
    print("\nmeasured change from pixels at each requested t: mean (std); last columns: mean std over the grid, "
          "mean |mean - t|")
    for factor, info in out["factors"].items():
        grid = list(next(iter(info["methods"].values()))["per_t"])
        print(f"\n{factor} ({info['unit']})")
        print("| method | " + " | ".join(f"t = {a}" for a in grid) + " | mean std | mean abs bias |")
        print("| --- |" + " ---: |" * (len(grid) + 2))
        for m, s in info["methods"].items():
            cells = [f"{s['per_t'][a]['mean']:.3g} ({s['per_t'][a]['std']:.2g})" for a in grid]
            print(f"| {m} | " + " | ".join(cells) + f" | {s['mean_std']:.3g} | {s['mean_abs_bias']:.3g} |")


if __name__ == "__main__":
    raise SystemExit(main())
