"""Count edits by cloning an object inside a spatial code: the non-affine count editor.

Why it exists: an affine map z -> z + alpha*H(z) cannot add one object to a
scene whose objects are placed freely, because where the new object may go
depends on where all the others are (benchmarks/count_edit_bound.py: even on
ideal object codes the Wasserstein editor's additions collide 14-28 % of the
time, and on the shipped autoencoder's grid code it adds an object in 5 %).
A generator whose code has a spatial grid part (the shipped latent-ae: 16
scene-wide numbers + a 2 x 8 x 8 grid, each cell speaking for its own 8 x 8 px)
lets an editor do what the affine map cannot: find the objects in the code,
find free space, and copy one object's cells there (+1) or paint a component's
cells with the background cell (-1). Cells of the other objects are left as
they were, so their positions and classes are kept by construction; the new
object is a copy of one already in the scene, so it has the scene's colour.

Objects in the code: a cell belongs to an object when its distance from the
code's median cell (the background: most cells of a scene with few objects)
exceeds a threshold; 8-connected cells form one object. The threshold is the
only fitted number: chosen on the labeller's confidently labelled codes as the
one under which the number of such components best matches their count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from factory.errors import FactoryError

# Candidate thresholds: evenly spaced between these quantiles of all cells' activities in the
# fitting codes (most cells are background, so the median is background).
THRESHOLD_RANGE = (0.5, 0.995)
THRESHOLD_CANDIDATES = 60


@dataclass(frozen=True)
class GridLayout:
    """Where the spatial grid sits in a flat code: ``global_dim`` numbers first, then a
    ``channels`` x ``height`` x ``width`` grid flattened channel-major."""

    global_dim: int
    channels: int
    height: int
    width: int

    @property
    def latent_dim(self) -> int:
        return self.global_dim + self.channels * self.height * self.width

    def grid(self, z: np.ndarray) -> np.ndarray:
        """(B, D) codes -> (B, C, H, W) grids (a view)."""
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise FactoryError(f"codes of shape {tuple(z.shape)} do not fit a grid layout of {self.latent_dim} "
                               f"numbers ({self.global_dim} global + {self.channels}x{self.height}x{self.width})")
        return z[:, self.global_dim:].reshape(len(z), self.channels, self.height, self.width)

    def as_dict(self) -> dict:
        return {"global_dim": self.global_dim, "channels": self.channels, "height": self.height, "width": self.width}


def cell_activity(z: np.ndarray, layout: GridLayout) -> np.ndarray:
    """(B, H, W): each cell's distance from its code's median cell (the background)."""
    g = layout.grid(z)
    med = np.median(g.reshape(len(g), layout.channels, -1), axis=2)[:, :, None, None]
    return np.sqrt(((g - med) ** 2).sum(1))


def components(active: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of one code's active cells: (labels, how many)."""
    return ndimage.label(active, structure=np.ones((3, 3), bool))


def fit_threshold(z: np.ndarray, counts: np.ndarray, layout: GridLayout) -> tuple[float, dict]:
    """The activity threshold under which component counts best match ``counts``: the middle
    of the best-scoring range of candidate thresholds, the one farthest from either failure
    (objects split into pieces below it, neighbours merged or lost above it)."""
    act = cell_activity(z, layout)
    thresholds = np.linspace(*np.quantile(act, THRESHOLD_RANGE), THRESHOLD_CANDIDATES)
    exact = np.array([float((np.array([components(a > t)[1] for a in act]) == counts).mean())
                      for t in thresholds])
    best = np.flatnonzero(exact == exact.max())
    i = int(best[len(best) // 2])
    t = float(thresholds[i])
    return t, {"method": "clone", "threshold": t, "active_cell_share": round(float((act > t).mean()), 4),
               "component_count_exact": round(float(exact[i]), 4), "n_codes": int(len(z))}


def _place(free_dist: np.ndarray, h: int, w: int, gap: int) -> tuple[int, int] | None:
    """Top-left of the h x w box farthest from every active cell (chessboard distance at least
    ``gap``: 1 lets it touch a neighbour's cells), the first in raster order among equals:
    deterministic for a given code."""
    H, W = free_dist.shape
    best, where = gap - 1, None
    for y in range(H - h + 1):
        for x in range(W - w + 1):
            d = int(free_dist[y:y + h, x:x + w].min())
            if d > best:
                best, where = d, (y, x)
    return where


def clone_edit(z: np.ndarray, layout: GridLayout, threshold: float, change: int, max_box: int = 4,
               gap: int = 1, margin: int = 1) -> tuple[np.ndarray, list[str | None]]:
    """Add (change = +1) or remove (change = -1) one object in each code.

    Returns the edited codes and, per code, None or why it was left unchanged
    (no object found, none small enough to copy, no free place for it).
    """
    if change not in (1, -1):
        raise FactoryError(f"the clone editor adds or removes one object (change +1 or -1), got {change}")
    z = np.array(z, np.float32, copy=True)
    grids = layout.grid(z)  # a view: editing it edits z
    act = cell_activity(z, layout)
    reasons: list[str | None] = []
    for i, g in enumerate(grids):
        active = act[i] > threshold
        labels, k = components(active)
        if k == 0:
            reasons.append("no object found in the code")
            continue
        # Smallest component first: the likeliest to be one whole object, and the easiest to place.
        sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, k + 1))
        order = [int(c) + 1 for c in np.argsort(sizes, kind="stable")]
        if change == -1:
            c = order[0]
            background = np.median(g.reshape(layout.channels, -1), axis=1)
            g[:, labels == c] = background[:, None]
            reasons.append(None)
            continue
        free_dist = ndimage.distance_transform_cdt(~active, metric="chessboard")
        reason = f"no object spans at most {max_box}x{max_box} cells"
        for c in order:
            ys, xs = np.nonzero(labels == c)
            y0, x0 = ys.min(), xs.min()
            h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
            if h > max_box or w > max_box:
                continue
            at = _place(free_dist, h, w, gap)
            if at is None:
                reason = "no free place for another object"
                continue
            ty, tx = at
            # The object's cells and, with a margin, the quiet cells around it that no other
            # object holds (a stroke's faint edge can fall below the threshold).
            grown = ndimage.binary_dilation(labels == c, np.ones((3, 3), bool), iterations=margin) \
                if margin else labels == c
            grown &= (labels == 0) | (labels == c)
            dy, dx = ty - y0, tx - x0
            ys2, xs2 = np.nonzero(grown)
            inside = (ys2 + dy >= 0) & (ys2 + dy < layout.height) & (xs2 + dx >= 0) & (xs2 + dx < layout.width)
            ys2, xs2 = ys2[inside], xs2[inside]
            # Never over another object's cells: the margin may reach them when gap is small.
            free = labels[ys2 + dy, xs2 + dx] == 0
            ys2, xs2 = ys2[free], xs2[free]
            g[:, ys2 + dy, xs2 + dx] = g[:, ys2, xs2].copy()
            reason = None
            break
        reasons.append(reason)
    return z, reasons
