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
one under which the number of such components best matches their count. A code
in which it finds nothing to copy is read again at a few multiples of it.

Checked tries: where to put the copy and which object to copy are guesses about
how the decoder will draw it (a copy can come out as a fragment, or merge with a
neighbour). Given a check (the edit stage's: the labeller counts each
synthesised try), the editor makes up to ``tries`` different edits of a code and
keeps the one the check is surest of; on the latent-ae this took the share of
edits the independent counter sees as n + 1 from 0.93-0.98 to 0.98-0.99
(benchmarks/latent_edits.py). The check is only as good as the labeller.

Checked places: a copy that is clear of the other objects in the code grid can still be drawn
touching a neighbour (the decoder spreads a stroke past its cells), and the pixels then show
two objects fused into one blob where the label has two. Given a place check (the edit stage's:
:func:`copy_stands_clear` on the decoded try), a try counts only when its copy comes out as
one blob at least the world's gap (3 px) from every other object's ink; a code with no such
place is refused.

What an edit did (:class:`CloneMove`: the cells copied or erased, and the shift) goes
back to the caller, so the object's labels can move with it (:func:`carry_points`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from factory.errors import FactoryError

# Candidate thresholds: evenly spaced between these quantiles of all cells' activities in the
# fitting codes (most cells are background, so the median is background).
THRESHOLD_RANGE = (0.5, 0.995)
THRESHOLD_CANDIDATES = 60
# A code in which the fitted threshold finds no object to copy (a faint one: 4-6 % of encoded
# test scenes on the latent-ae), or only one too big to copy (two neighbours merged), is read
# again at these multiples of it, in this order: lower finds faint objects, higher splits merged ones.
THRESHOLD_LADDER = (1.0, 0.8, 1.25, 0.65, 1.5)


@dataclass(frozen=True, eq=False)
class CloneMove:
    """What one clone edit did, in grid cells: the source cells it copied (or erased), an
    (H, W) mask, and the shift (dy, dx) that took them to their new place (None: erased).
    The edit stage moves the sample's point labels with it (:func:`carry_points`)."""

    cells: np.ndarray
    shift: tuple[int, int] | None


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


def _places(free_dist: np.ndarray, h: int, w: int, gap: int, spread: int = 2, border: int = 0) -> list[tuple[int, int]]:
    """Top-left corners of h x w boxes at chessboard distance at least ``gap`` from every active
    cell (1 lets a box touch a neighbour's cells): first those that stay ``border`` cells inside
    the frame, then the rest; farthest first within each, and in raster order among equals
    (deterministic for a given code). A corner within ``spread`` - 1 cells of a better one is
    left out, so that a second try is a different place, not the first moved by a cell.

    Why the frame first: the farthest place from every object is most often at the frame, and
    a copy whose margin cells fall outside it is cut off there (0.40 of the boxes carried with
    the copies went past the frame when distance alone ranked places; the world never cuts a
    digit)."""
    H, W = free_dist.shape
    found = []
    for y in range(H - h + 1):
        for x in range(W - w + 1):
            d = int(free_dist[y:y + h, x:x + w].min())
            if d >= gap:
                inside = border <= y <= H - h - border and border <= x <= W - w - border
                found.append((not inside, -d, y, x))
    kept: list[tuple[int, int]] = []
    for _, _, y, x in sorted(found):
        if all(max(abs(y - ky), abs(x - kx)) >= spread for ky, kx in kept):
            kept.append((y, x))
    return kept


def _ranked(n_objects: int, n_places: list[int], limit: int) -> list[tuple[int, int]]:
    """(object rank, place rank) pairs in the order to try them: by the sum of the two ranks,
    the likelier object first among equals. The first pair is the best place of the best object."""
    pairs = [(o + p, o, p) for o in range(n_objects) for p in range(n_places[o])]
    return [(o, p) for _, o, p in sorted(pairs)[:limit]]


Candidate = tuple[np.ndarray, CloneMove]


def clone_candidates(code: np.ndarray, layout: GridLayout, threshold: float, change: int, max_box: int = 4,
                     gap: int = 1, margin: int = 1, limit: int = 1) -> tuple[list[Candidate], str | None]:
    """Up to ``limit`` edits of one code (D,) that each add (change +1) or remove (-1) one object,
    best first, as (edited code, what it did), or no edit and why none can be made.

    +1: copy an object (smallest first: the likeliest to be one whole object, and the easiest
    to place) to a free place (farthest from every object first). -1: paint an object (smallest
    first) with the code's median cell. The first candidate is the editor's own choice; the
    others are what a check that rejects it may try next (:func:`clone_edit`)."""
    if change not in (1, -1):
        raise FactoryError(f"the clone editor adds or removes one object (change +1 or -1), got {change}")
    code = np.asarray(code, np.float32)
    g = layout.grid(code[None])[0]
    active = cell_activity(code[None], layout)[0] > threshold
    labels, k = components(active)
    if k == 0:
        return [], "no object found in the code"
    sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, k + 1))
    order = [int(c) + 1 for c in np.argsort(sizes, kind="stable")]
    boxes = {c: (int(sl[0].start), int(sl[1].start), int(sl[0].stop - sl[0].start), int(sl[1].stop - sl[1].start))
             for c, sl in enumerate(ndimage.find_objects(labels), start=1)}

    def edited(cells: np.ndarray, values: np.ndarray, shift: tuple[int, int] | None) -> Candidate:
        out = code.copy()
        dy, dx = shift or (0, 0)
        ys, xs = np.nonzero(cells)
        layout.grid(out[None])[0][:, ys + dy, xs + dx] = values[:, ys, xs]  # a view into out
        return out, CloneMove(cells, shift)

    if change == -1:
        background = np.broadcast_to(np.median(g.reshape(layout.channels, -1), axis=1)[:, None, None], g.shape)
        return [edited(labels == c, background, None) for c in order[:limit]], None
    free_dist = ndimage.distance_transform_cdt(~active, metric="chessboard")
    movable, places = [], []
    reason = f"no object spans at most {max_box}x{max_box} cells"
    for c in order:
        _, _, h, w = boxes[c]
        if h > max_box or w > max_box:
            continue
        found = _places(free_dist, h, w, gap, border=margin)
        if not found:
            reason = "no free place for another object"
            continue
        movable.append(c)
        places.append(found)
    if not movable:
        return [], reason

    def copy(c, ty, tx):
        # The object's cells and, with a margin, the quiet cells around it that no other
        # object holds (a stroke's faint edge can fall below the threshold).
        y0, x0, _, _ = boxes[c]
        grown = ndimage.binary_dilation(labels == c, np.ones((3, 3), bool), iterations=margin) \
            if margin else labels == c
        grown &= (labels == 0) | (labels == c)
        dy, dx = ty - y0, tx - x0
        ys2, xs2 = np.nonzero(grown)
        inside = (ys2 + dy >= 0) & (ys2 + dy < layout.height) & (xs2 + dx >= 0) & (xs2 + dx < layout.width)
        ys2, xs2 = ys2[inside], xs2[inside]
        # Never over another object's cells: the margin may reach them when gap is small.
        free = labels[ys2 + dy, xs2 + dx] == 0
        cells = np.zeros_like(grown)
        cells[ys2[free], xs2[free]] = True
        return edited(cells, g, (int(dy), int(dx)))

    return [copy(movable[o], *places[o][p])
            for o, p in _ranked(len(movable), [len(x) for x in places], limit)], None


def _ladder_candidates(code, layout, threshold, change, max_box, gap, margin, limit):
    """Candidates at the fitted threshold, then at the others of THRESHOLD_LADDER while fewer than
    ``limit`` were found; the reason is the fitted threshold's when no rung gives any."""
    out, first_reason = [], None
    for k, factor in enumerate(THRESHOLD_LADDER):
        cands, why = clone_candidates(code, layout, threshold * factor, change, max_box, gap, margin, limit - len(out))
        first_reason = why if k == 0 else first_reason
        out += [c for c in cands if not any(np.array_equal(c[0], o[0]) for o in out)]
        if len(out) >= limit:
            break
    return out, (None if out else first_reason)


# Edited codes scored per call of a check: bounds the images a check decodes at once.
CHECK_BATCH = 256
Check = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
# Whether each try's copy stands clear in the decoded image: (codes, moves) -> passes.
PlaceCheck = Callable[[np.ndarray, list], np.ndarray]
# Places a place check may try per code when the labeller does not pick among tries.
PLACE_TRIES = 16


def copy_stands_clear(image: np.ndarray, move: CloneMove, cell: tuple[float, float], gap: float) -> bool:
    """Whether a copy (``move`` with a shift) is drawn in ``image`` as one ink blob inside the
    cells it was copied to, at least ``gap`` px from every other object's ink (the world's rule:
    3 px). Erasures (no shift) pass."""
    from scipy.ndimage import distance_transform_edt

    from factory.world.object_check import ink_components
    from factory.world.pixel_counter import ink_mask

    if move.shift is None:
        return True
    dy, dx = move.shift
    H, W = move.cells.shape
    ys, xs = np.nonzero(move.cells)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
    target = np.zeros((H, W), bool)
    target[ys[keep], xs[keep]] = True
    ch, cw = int(round(cell[0])), int(round(cell[1]))
    region = np.kron(target, np.ones((ch, cw), bool))[: image.shape[0], : image.shape[1]]
    labels, _ = ink_components(image)
    ids = np.unique(labels[region & (labels > 0)])
    if len(ids) != 1:  # the copy drew nothing, or came out in pieces
        return False
    blob = labels == ids[0]
    if (blob & ~region).any():  # it reaches past its cells: fused with a neighbour
        return False
    ink = ink_mask(image)
    others = ink & ~blob
    if not others.any():
        return True
    return float(distance_transform_edt(~others)[ink & blob].min(initial=np.inf)) >= gap


def clone_edit(z: np.ndarray, layout: GridLayout, threshold: float, change: int, max_box: int = 4,
               gap: int = 1, margin: int = 1, tries: int = 1, check: Check | None = None,
               judge: str = "the check", place_check: PlaceCheck | None = None,
               place_rule: str = "clear of the other objects") -> tuple[np.ndarray, list[str | None], list[CloneMove | None]]:
    """Add (change = +1) or remove (change = -1) one object in each code.

    Without ``check`` (or with ``tries`` 1) each code gets :func:`clone_candidates`' first edit.
    With it, up to ``tries`` candidates per code are scored: ``check(codes, rows)`` returns, for
    a batch of edited codes (rows: the index of each one's source code), a score (how sure the
    check is that the edit came out as intended, e.g. a labeller's probability of the target
    count in the synthesised image) and whether it passes. Each code takes its best-scoring
    candidate, and is refused when that one does not pass.

    Best of several, not the first that passes: a labeller's yes is noisy, and the first edit
    it said yes to was more often wrong (with the first, 1,000-step labeller, on 164 encoded
    test scenes, the independent counter saw a third object after 0.90 of its first yeses and
    0.97 of its best scores; past 16 tries its own errors won more often: 3 -> 4 gave 0.94 at
    16 tries, 0.92 at 40).

    ``place_check(codes, moves)`` (the decoded copy stands clear: :func:`copy_stands_clear`)
    runs first, on up to max(``tries``, PLACE_TRIES) places per code; tries that fail it are
    dropped, and a code none of whose places passes is refused (``place_rule`` says what was
    asked). Without a labeller check, a code takes its first place that passes.

    Returns the edited codes, per code None or why it was left unchanged (no object found,
    none small enough to copy, no free place for it, no place passed the place check, or
    ``judge`` passed none of its tries), and per code what its edit did (None where it was
    left unchanged).
    """
    z = np.array(z, np.float32, copy=True)
    layout.grid(z)  # raises with the shape of codes that do not fit the layout
    tries = max(1, int(tries)) if check is not None else 1
    limit = max(tries, PLACE_TRIES) if place_check is not None else tries
    found = [_ladder_candidates(code, layout, threshold, change, max_box, gap, margin, limit) for code in z]
    if place_check is not None:
        found = _placed(found, place_check, place_rule, tries)
    reasons: list[str | None] = [why for _, why in found]
    moves: list[CloneMove | None] = [None] * len(z)
    if tries == 1:
        for i, (cands, _) in enumerate(found):
            if cands:
                z[i], moves[i] = cands[0]
        return z, reasons, moves
    flat = [(i, c, m) for i, (cands, _) in enumerate(found) for c, m in cands]
    scores, passes = np.empty(len(flat)), np.zeros(len(flat), bool)
    for s in range(0, len(flat), CHECK_BATCH):
        part = flat[s:s + CHECK_BATCH]
        sc, ok = check(np.stack([c for _, c, _ in part]), np.array([i for i, _, _ in part]))
        scores[s:s + len(part)], passes[s:s + len(part)] = sc, ok
    rows = np.array([i for i, _, _ in flat], int)
    for i, (cands, _) in enumerate(found):
        if not cands:
            continue
        at = np.flatnonzero(rows == i)
        best = at[int(np.argmax(scores[at]))]
        if passes[best]:
            z[i], moves[i] = flat[best][1:]
        else:
            reasons[i] = f"{judge} passed none of the {len(cands)} edits tried"
    return z, reasons, moves


def _placed(found: list, place_check: PlaceCheck, rule: str, tries: int) -> list:
    """Each code's candidates that pass the place check, at most ``tries`` of them, best first;
    a code whose candidates all fail gets the reason."""
    flat = [(i, c, m) for i, (cands, _) in enumerate(found) for c, m in cands]
    passes = np.zeros(len(flat), bool)
    for s in range(0, len(flat), CHECK_BATCH):
        part = flat[s:s + CHECK_BATCH]
        passes[s:s + len(part)] = place_check(np.stack([c for _, c, _ in part]), [m for _, _, m in part])
    out = []
    for i, (cands, why) in enumerate(found):
        kept = [(c, m) for (j, c, m), ok in zip(flat, passes) if j == i and ok][:tries]
        if cands and not kept:
            why = f"none of the {len(cands)} places tried gave a copy drawn {rule}"
        out.append((kept, why))
    return out


def carry_points(move: CloneMove, points: list, cell: tuple[float, float],
                 per_object: dict[str, list] | None = None) -> tuple[list, dict[str, list]] | str:
    """The sample's object labels after a clone edit, or why they cannot be carried over.

    ``points`` are (x, y) object centres in the image's pixels, ``cell`` the (height, width) in
    pixels a grid cell speaks for, ``per_object`` other labels with one entry per point (e.g.
    boxes (x0, y0, x1, y1), digit classes, sizes). A copy adds its source object's point moved
    by the shift, and a copy of each of its entries (a box moved with it); an erasure removes
    them. The source object is the one point among the edited cells: with none there (the
    cells held no labelled object) or several (two objects read as one), which object moved is
    not known, and nothing is carried. The other objects keep their cells, so their labels
    hold. A list that is not one entry per point (a source's few exemplar boxes) is left out
    of the result."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    H, W = move.cells.shape
    cy = np.floor(pts[:, 1] / cell[0]).astype(int)
    cx = np.floor(pts[:, 0] / cell[1]).astype(int)
    on_grid = (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
    inside = np.zeros(len(pts), bool)
    inside[on_grid] = move.cells[cy[on_grid], cx[on_grid]]
    hits = np.flatnonzero(inside)
    if len(hits) != 1:
        what = "copied" if move.shift is not None else "erased"
        return f"the {what} cells hold {len(hits)} of the sample's points, not one"
    k = int(hits[0])
    if move.shift is None:
        return object_lists(pts, per_object, k)
    oy, ox = move.shift[0] * cell[0], move.shift[1] * cell[1]
    height, width = H * cell[0], W * cell[1]
    boxes = (per_object or {}).get("boxes")
    box = None
    if boxes is not None and len(boxes) == len(pts):
        # The copy's box: the source's moved, and cut at the frame as the image cuts the copy.
        x0, y0, x1, y1 = (float(c) for c in boxes[k])
        box = [float(np.clip(x0 + ox, 0, width)), float(np.clip(y0 + oy, 0, height)),
               float(np.clip(x1 + ox, 0, width)), float(np.clip(y1 + oy, 0, height))]
    return object_lists(pts, per_object, k, (float(pts[k, 0] + ox), float(pts[k, 1] + oy)), box)


def object_lists(pts: np.ndarray, per_object: dict[str, list] | None, k: int, added_point=None,
                 added_box=None) -> tuple[list, dict[str, list]]:
    """Points and per-object lists after object ``k`` is removed (``added_point`` None) or copied
    to ``added_point`` with box ``added_box`` (its other entries, a digit or a size, go with it).
    A list that is not one entry per point (a source's few exemplar boxes) is left out."""
    lists = {name: list(v) for name, v in (per_object or {}).items() if v is not None and len(v) == len(pts)}
    new_points = [[float(x), float(y)] for x, y in pts]
    if added_point is None:
        del new_points[k]
        for v in lists.values():
            del v[k]
        return new_points, lists
    new_points.append([float(added_point[0]), float(added_point[1])])
    for name, v in lists.items():
        v.append([float(c) for c in added_box] if name == "boxes" else v[k])
    return new_points, lists
