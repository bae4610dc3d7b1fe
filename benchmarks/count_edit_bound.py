"""How far can an affine latent edit "add one object" in this world? A bound on ideal codes.

The count table of benchmarks/latent_edits.py asks an affine map
z -> z + alpha*H(z) to add one digit. Whether any generator could let it
succeed depends on the world as much as on the generator: adding a digit means
choosing a free place for it, and where the free space is depends on where the
other digits are, which an affine map can only follow linearly.

This benchmark removes the generator from the question. It encodes layouts
drawn by the world's own placement rule as ideal object codes, the code a
perfect object-centric generator would have: 12 slots of (present, centre x,
centre y, side), objects in raster order, empty slots zero. It then fits the
factory's own Wasserstein editor (factory.latent.editors.fit_wasserstein_map,
Sinkhorn divergence, n -> n+1 codes) and a plain linear direction (centroid
difference) on train layouts, applies them to held-out layouts with n objects,
and reads the edited layouts straight off the codes: an edit succeeds when
exactly n+1 slots are present, every square is in the frame, and no two
squares overlap ("no overlap"), or are closer than the world's 3 px gap
("world gap"). No image is drawn, so a counter's mistakes play no part: the
rates are an upper bound on what the same editors reach through any generator
whose code is no better than this one.

    python benchmarks/count_edit_bound.py [--n-fit 2000] [--n-test 500] [--seeds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.latent.editors import fit_wasserstein_map  # noqa: E402
from factory.world.scenes import GAP, MAX_COUNT, SIZE, layout, rng_for  # noqa: E402

SLOT = 4  # present, centre x, centre y, side (all in units of the image / the largest side)


def object_code(squares: list[tuple[int, int, int]]) -> np.ndarray:
    """Ideal object code of a layout: one slot per square in raster order, empty slots zero."""
    z = np.zeros((MAX_COUNT, SLOT), np.float32)
    centred = sorted(((x + s / 2, y + s / 2, s) for x, y, s in squares), key=lambda t: (t[1], t[0]))
    for i, (cx, cy, s) in enumerate(centred):
        z[i] = (1.0, cx / SIZE, cy / SIZE, s / 16.0)
    return z.ravel()


def squares_of(code: np.ndarray) -> list[tuple[float, float, float]]:
    slots = code.reshape(MAX_COUNT, SLOT)
    present = slots[:, 0] > 0.5
    return [(cx * SIZE, cy * SIZE, s * 16.0) for _, cx, cy, s in slots[present]]


def valid(code: np.ndarray, n: int, gap: float) -> bool:
    """Exactly n squares, each inside the frame (1 px slack), pairwise at least ``gap`` px apart."""
    sq = squares_of(code)
    if len(sq) != n:
        return False
    for i, (x, y, s) in enumerate(sq):
        if min(x, y) - s / 2 < -1 or max(x, y) + s / 2 > SIZE + 1:
            return False
        for x2, y2, s2 in sq[:i]:
            if max(abs(x - x2), abs(y - y2)) < (s + s2) / 2 + gap:
                return False
    return True


def layouts(split: str, n: int, count: int) -> np.ndarray:
    return np.stack([object_code(layout(rng_for("count-bound", split, n, i), n)) for i in range(count)])


def rates(edited: np.ndarray, n: int) -> dict:
    return {"no_overlap": round(float(np.mean([valid(z, n, 0.0) for z in edited])), 3),
            "world_gap": round(float(np.mean([valid(z, n, GAP) for z in edited])), 3),
            "count_right": round(float(np.mean([(z.reshape(MAX_COUNT, SLOT)[:, 0] > 0.5).sum() == n
                                                for z in edited])), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fit", type=int, default=2000, help="train layouts per count")
    ap.add_argument("--n-test", type=int, default=500, help="held-out layouts per source count")
    ap.add_argument("--transitions", type=int, nargs="+", default=[1, 2, 3], help="source counts n of n -> n+1")
    ap.add_argument("--seeds", type=int, default=3, help="fitting seeds of the Wasserstein editor")
    ap.add_argument("--blur", type=float, nargs="+", default=[0.05, 0.5],
                    help="Sinkhorn blurs to try (units of spread*sqrt(d); the editor's default is 0.5)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    counts = sorted({c for n in args.transitions for c in (n, n + 1)})
    fit = {c: layouts("train", c, args.n_fit) for c in counts}
    report = {"config": vars(args), "transitions": {}}
    for n in args.transitions:
        src, tgt, test = fit[n], fit[n + 1], layouts("test", n, args.n_test)
        row = {"linear": rates(test + (tgt.mean(0) - src.mean(0)), n + 1)}
        for blur in args.blur:
            runs = []
            for seed in range(args.seeds):
                A, b, _ = fit_wasserstein_map(src, tgt, alpha=1.0, seed=seed, blur=blur, preserve=0.0)
                runs.append(rates(test + (test @ A.T + b), n + 1))
            row[f"wasserstein_blur{blur:g}"] = {k: round(float(np.mean([r[k] for r in runs])), 3) for k in runs[0]}
        report["transitions"][f"{n}->{n + 1}"] = row
        print(f"{n}->{n + 1}: {json.dumps(row)}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
