"""The slot editor: count edits on an object-slot generator (:mod:`factory.models.slots`), where
presence is explicit, so +1 switches one slot on and -1 switches one off, and the edited
object's box is known from the code rather than guessed from the image.

+1: the new object copies the appearance (``what``) and size of an object already in the
scene (one colour per scene, as the world draws it; the copied object's digit and size are
then its labels too) and is put at the centre of a free cell. Free cells are tried in a
seeded order, ``tries`` at most; a place is taken only when the copy's drawn ink lies inside
the frame and stands ``pixel_gap`` px clear of every other object's drawn ink (the world's
gap; closer, the pixel check reads two objects as one blob). A code with no such place fails
with that reason.

-1: one present slot, chosen by the seed, is switched off; the background shows where it was.

Nothing is fitted: the editor reads the code. The sample's labels are carried by matching the
edited slot to the labelled point inside its drawn box (``carry_labels``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from factory.errors import FactoryError
from factory.latent.editors.common import EditorFamily

SLOT = "slot"
HYPER = {
    "tries": 16,       # free cells tried per code for +1
    "pixel_gap": 3,    # px of background between the new object's ink and any other's (0: no rule)
}
INK = 0.5  # a slot's drawn alpha above this is its ink
MARGIN = 2.0  # px a labelled point may lie outside its slot's drawn box and still be its object


@dataclass
class SlotMove:
    """What one slot edit did: the slot switched on (``copied_from`` the slot whose appearance it
    took) or off (``copied_from`` None), with the slot's drawn box before (off) or after (on)."""

    slot: int
    box: list[float]
    copied_from: int | None = None
    shift: tuple[float, float] | None = None  # (dx, dy) px from the copied object's glimpse centre
    source_box: list[float] | None = None  # the copied object's drawn box, to find its labelled point

    def as_dict(self) -> dict:
        return {"slot": self.slot, "box": [round(float(v), 2) for v in self.box],
                "copied_from": self.copied_from,
                "shift": None if self.shift is None else [round(float(v), 2) for v in self.shift]}


def _ink_boxes(ink: torch.Tensor) -> list[list[float] | None]:
    """(S, H, W) bool -> each slot's tight box x0, y0, x1, y1 (exclusive), None when it has no ink."""
    out = []
    for m in ink:
        ys, xs = torch.nonzero(m.any(1))[:, 0], torch.nonzero(m.any(0))[:, 0]
        out.append(None if len(ys) == 0 else [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)])
    return out


def _dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    if px <= 0:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * px + 1, stride=1, padding=px)[0, 0] > 0


def slot_edit(model, z: np.ndarray, change: int, seeds: list[int], tries: int = 16,
              pixel_gap: float = 3) -> tuple[np.ndarray, list[str | None], list[SlotMove | None]]:
    """Each code with one slot switched on (+1) or off (-1); per code why it was left unchanged
    (None when edited) and the :class:`SlotMove`."""
    if change not in (1, -1):
        raise FactoryError(f"the slot editor adds or removes one object: change must be +1 or -1, got {change}")
    layout = model.layout
    zt = torch.as_tensor(z, dtype=torch.float32)
    out = zt.clone()
    reasons: list[str | None] = []
    moves: list[SlotMove | None] = []
    with torch.no_grad():
        alphas = model.slot_alphas(zt)  # (n, S, H, W)
    bg, pres, where, what = layout.split(zt)
    H, W = alphas.shape[-2:]
    gap = int(np.ceil(pixel_gap))
    for b in range(len(zt)):
        rng = np.random.default_rng(int(seeds[b]))
        on = [int(s) for s in torch.nonzero(pres[b] > 0.5)[:, 0]]
        ink = alphas[b] > INK
        boxes = _ink_boxes(ink)
        if change == -1:
            if not on:
                reasons.append("no slot is present: there is no object to remove")
                moves.append(None)
                continue
            s = int(rng.choice(on))
            row = out[b, layout.bg_dim:].view(layout.n_slots, layout.slot_dim)
            row[s, 0] = 0.0
            reasons.append(None)
            moves.append(SlotMove(s, boxes[s] or [0, 0, 0, 0]))
            continue
        sources = [s for s in on if boxes[s] is not None]
        if not sources:
            reasons.append("no present slot draws an object whose appearance a new one could copy")
            moves.append(None)
            continue
        free = [s for s in range(layout.n_slots) if s not in on]
        order = rng.permutation(len(free))[:tries]
        others = ink[on].any(0) if on else torch.zeros(H, W, dtype=torch.bool)
        blocked = _dilate(others, gap)
        src = int(rng.choice(sources))
        # Every candidate drawn at once: the source's appearance and size at each free cell's centre.
        cand = [free[i] for i in order]
        trial = zt[b:b + 1].repeat(len(cand), 1)
        rows = trial[:, layout.bg_dim:].view(len(cand), layout.n_slots, layout.slot_dim)
        for j, s in enumerate(cand):
            rows[j, :, 0] = 0.0  # only the candidate, so its own ink is seen alone
            rows[j, s, 0] = 1.0
            rows[j, s, 1:3] = 0.0  # the cell's centre
            rows[j, s, 3] = where[b, src, 2]
            rows[j, s, 4:] = what[b, src]
        with torch.no_grad():
            cand_alpha = model.slot_alphas(trial)
        chosen = None
        for j, s in enumerate(cand):
            new_ink = cand_alpha[j, s] > INK
            if not new_ink.any():
                continue
            ys, xs = torch.nonzero(new_ink.any(1))[:, 0], torch.nonzero(new_ink.any(0))[:, 0]
            if ys[0] == 0 or xs[0] == 0 or ys[-1] == H - 1 or xs[-1] == W - 1:
                continue  # cut by the frame: the world draws whole digits
            if (new_ink & blocked).any():
                continue
            chosen = (j, s, _ink_boxes(new_ink[None])[0])
            break
        if chosen is None:
            reasons.append(f"none of {len(cand)} free places tried fits a copy of an object with its ink "
                           f"inside the frame and {pixel_gap:g} px from the other objects")
            moves.append(None)
            continue
        j, s, box = chosen
        row = out[b, layout.bg_dim:].view(layout.n_slots, layout.slot_dim)
        row[s] = rows[j, s]
        centre, _ = model.boxes(layout.split(out[b:b + 1])[2])  # every slot's glimpse centre, px
        shift = (centre[0, s] - centre[0, src]).tolist()
        reasons.append(None)
        moves.append(SlotMove(s, box, src, (shift[0], shift[1]), boxes[src]))
    return out.numpy(), reasons, moves


def carry_labels(move: SlotMove, points: list,
                 per_object: dict[str, list] | None = None) -> tuple[list, dict[str, list]] | str:
    """The sample's object labels after a slot edit, or why they cannot be carried.

    The edited (removed or copied) slot's object is the one labelled point inside its drawn box
    (grown by ``MARGIN`` px); with none or several, which object it is is not known. A removal
    drops that point and its entries; a copy appends the point moved by the shift, the copy's
    drawn box, and the copied object's other entries (digit, size). The boxes are the ones
    :func:`slot_edit` drew, so nothing is decoded again."""
    box = move.source_box if move.copied_from is not None else move.box
    if box is None:
        return "the edited slot draws no ink, so no labelled object is its"
    from factory.latent.clone import object_lists

    pts = np.asarray(points, np.float64).reshape(-1, 2)
    inside = _points_in(pts, box)
    if len(inside) != 1:
        what = "removed" if move.copied_from is None else "copied"
        return f"the {what} slot's drawn box holds {len(inside)} of the sample's points, not one"
    k = int(inside[0])
    if move.copied_from is None:
        return object_lists(pts, per_object, k)
    dx, dy = move.shift
    return object_lists(pts, per_object, k, (pts[k, 0] + dx, pts[k, 1] + dy), move.box)


def _points_in(pts: np.ndarray, box) -> np.ndarray:
    """Indices of the points (n, 2) inside a box x0, y0, x1, y1 grown by ``MARGIN`` px."""
    x0, y0, x1, y1 = box
    return np.flatnonzero((pts[:, 0] >= x0 - MARGIN) & (pts[:, 0] <= x1 + MARGIN)
                          & (pts[:, 1] >= y0 - MARGIN) & (pts[:, 1] <= y1 + MARGIN))


def instance_mask(model, z: np.ndarray, points: list) -> np.ndarray | None:
    """The instance mask of a slot code's image (DESIGN §3: 0 background, i the i-th of ``points``):
    each present slot's drawn ink, numbered by the one labelled point inside its drawn box. None
    when slots and points do not pair one to one (the mask would mislabel an object)."""
    with torch.no_grad():
        ink = (model.slot_alphas(torch.as_tensor(np.asarray(z)[None], dtype=torch.float32))[0] > INK).numpy()
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) >= 2**16:
        return None
    mask = np.zeros(ink.shape[1:], np.uint8 if len(pts) < 256 else np.uint16)
    used: set[int] = set()
    for slot, box in enumerate(_ink_boxes(torch.from_numpy(ink))):
        if box is None:
            continue
        inside = _points_in(pts, box)
        if len(inside) != 1 or int(inside[0]) in used:
            return None
        k = int(inside[0])
        used.add(k)
        mask[ink[slot] & (mask == 0)] = k + 1
    return mask if len(used) == len(pts) else None


def slot_count(z: np.ndarray, layout) -> np.ndarray:
    """The number of present slots of each code: the count the code itself says."""
    _, pres, _, _ = layout.split(torch.as_tensor(z, dtype=torch.float32))
    return (pres > 0.5).sum(1).numpy().astype(int)


def _no_fit(*_args, **_kwargs):
    raise FactoryError("the slot editor is not fitted: it reads presence from the code")


def _no_step(*_args, **_kwargs):
    raise FactoryError("the slot editor edits through factory.latent.editors.slot.slot_edit, not an artefact step")


SLOT_FAMILY = EditorFamily(SLOT, __name__, HYPER, _no_fit, _no_step, labelled=False)
