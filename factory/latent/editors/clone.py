"""The clone editor's glue to the artefact machinery: count edits on a generator whose code has a
spatial grid (the maths is in :mod:`factory.latent.clone`). Fitted: one object threshold
(:func:`fit_clone`); checked: the labeller's count of each synthesised try (:func:`count_check`)
and the decoded copy standing clear of the other objects (:func:`pixel_gap_check`)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from factory.errors import FactoryError
from factory.latent.editors.classifier import count_columns
from factory.latent.editors.codes import LabelledCodes
from factory.latent.editors.common import EditorFamily

# Hyper-parameters and their defaults.
HYPER = {
    "max_box": 4,          # largest object copied, in grid cells a side (4 cells = 32 px on the latent-ae)
    # Least chessboard distance, in cells, from the copy to another object's cells. 1 (cells may
    # touch) added an object as often as 2 on the latent-ae (0.81 vs 0.78 for 1 -> 2) and
    # finds room more often: a digit rarely fills its cells to the edge.
    "gap": 1,
    # Quiet cells around the object copied with it (never over another object's cells):
    # a stroke's faint edge falls below the threshold; 1 added an object 3-7 points more often.
    "margin": 1,
    # Edits tried per code when the stage can check them (count edits: the labeller counts
    # each synthesised try, and the code takes the try it is surest has the target count).
    # 1: the editor's first choice, unchecked. See clone_edit for why 16.
    "tries": 16,
    # px of background the decoded copy must keep from every other object's ink (the world's
    # gap; the pixel check reads two blobs closer than that as one). 0: no pixel check.
    "pixel_gap": 3,
}


def fit_clone(spec: dict, codes: LabelledCodes) -> tuple[dict, dict]:
    """The clone editor's one fitted number, its object threshold, on the codes the labeller
    is sure of the count of; the generator's grid layout comes from its folder."""
    from factory.latent.clone import fit_threshold
    from factory.latent.generator import load_generator

    if not spec.get("generator"):
        raise FactoryError("the clone editor needs the generator in its spec: it reads the code's grid layout")
    layout = load_generator(spec["generator"]).grid_layout
    if layout is None:
        raise FactoryError(f"the clone editor needs a generator whose code has a spatial grid (the shipped "
                           f"latent-ae); {spec['generator']} has none: use editor wasserstein or classifier")
    # Near the transition's counts only: the median cell stands for the background in scenes
    # with few objects, not in crowded ones, where it may be an object's.
    ok = codes.confident(spec["confidence"], [], count=True) & (np.abs(codes.count - spec["transition"][0]) <= 2)
    if ok.sum() < 20:
        raise FactoryError(f"too few codes with a confident count ({int(ok.sum())} of {len(codes)} above "
                           f"{spec['confidence']}) to fit the clone editor's threshold: raise n_fit or lower confidence")
    threshold, stats = fit_threshold(codes.z[ok], codes.count[ok], layout)
    stats["layout"] = layout.as_dict()
    return {"threshold": torch.tensor([threshold])}, stats


def count_check(generator, labeller, targets) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A check of count edits for the clone editor: synthesise each edited code and let the
    labeller (the one that labelled the fitting codes, never the independent checker) say how
    sure it is that the image holds the code's target count (``targets[row]``), and whether
    that is its count. The checker that grades the edit afterwards stays independent."""
    from factory.latent.attributes import COUNTS  # every labeller's count head: 1-12

    targets = np.asarray(targets, int)
    columns = count_columns(targets, COUNTS)

    def check(codes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = labeller.predict(generator.synthesize(torch.from_numpy(codes).to(generator.device)))
        score = out["count_probs"][np.arange(len(rows)), columns[rows]]
        return score, np.asarray(out["count"]) == targets[rows]

    return check


def pixel_gap_check(generator, gap: float):
    """A place check for the clone editor: synthesise each try and keep it only where the copy
    is drawn as one blob at least ``gap`` px from every other object's ink
    (:func:`factory.latent.clone.copy_stands_clear`)."""
    from factory.latent.clone import copy_stands_clear
    from factory.latent.inversion import to_uint8

    layout = generator.grid_layout
    cell = (generator.image_size / layout.height, generator.image_size / layout.width)

    def check(codes: np.ndarray, moves: list) -> np.ndarray:
        with torch.no_grad():
            images = to_uint8(generator.synthesize(torch.from_numpy(codes).to(generator.device)))
        return np.array([copy_stands_clear(im, m, cell, gap) for im, m in zip(images, moves)], bool)

    return check


def clone_codes(art, z: torch.Tensor, check=None, place_check=None) -> tuple[torch.Tensor, list[str | None], list]:
    """The clone editor's edit of each code, why a code was left unchanged (None when edited),
    and what each edit did (a :class:`~factory.latent.clone.CloneMove`, None when unchanged).

    ``check``: scores the editor's tries (:func:`count_check`: the labeller's count of each
    synthesised try); each code takes its best of ``tries`` (a hyper-parameter). Without it,
    the editor's first choice. ``place_check``: whether each try's decoded copy stands
    clear of the other objects (:func:`pixel_gap_check`); tries that fail it are dropped."""
    from factory.latent.clone import GridLayout, clone_edit

    h = {**HYPER, **art.spec.get("hyper", {})}
    change = art.transition[1] - art.transition[0]
    out, reasons, moves = clone_edit(z.detach().cpu().numpy(), GridLayout(**art.stats["layout"]),
                                     float(art.stats["threshold"]), change, int(h["max_box"]), int(h["gap"]),
                                     int(h["margin"]), int(h["tries"]), check, "the labeller", place_check,
                                     f"as one blob at least {h['pixel_gap']:g} px from the other objects' ink")
    return torch.from_numpy(out).to(z.device), reasons, moves


def _step(art, z: torch.Tensor, target=None, check=None, place_check=None):
    """The cloned (or erased) code minus z: alpha 1 is the copy (or the erasure) itself."""
    cloned, reasons, moves = clone_codes(art, z, check, place_check)
    return cloned - z, reasons, moves


CLONE = EditorFamily("clone", __name__, HYPER, fit_clone, _step)
