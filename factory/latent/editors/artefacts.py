"""Fitted edits as artefacts: a canonical spec, a key hashing everything that decides it, saved
once under a cache folder and loaded by every run that asks for the same edit
(:func:`fit_or_load`). :class:`EditArtefact` applies any family's fitted edit through the
``EDITORS`` table."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from factory.errors import FactoryError
from factory.latent.editors.codes import LabelledCodes, labelled_codes
from factory.latent.editors.common import (ARTEFACT_VERSION, DEFAULT_CACHE, _atomic, _jsonable, model_fingerprint,
                                           project_to_ball)


def _table():
    """The EDITORS table (imported late: the family modules import this one)."""
    from factory.latent.editors import EDITORS

    return EDITORS


@dataclass
class EditArtefact:
    """A fitted edit: its spec, tensors and fitting statistics.

    Directions hold ``u``; Wasserstein maps ``A`` and ``b``; classifier editors
    the latent classifier's state (``clf.*``). :meth:`edit` applies any of them.
    """

    id: str
    spec: dict
    tensors: dict[str, torch.Tensor]
    stats: dict
    path: str | None = None
    from_cache: bool = False
    _classifier: object = field(default=None, repr=False)  # the classifier editor's, once built

    @property
    def editor(self) -> str:
        return self.spec["editor"]

    @property
    def transition(self) -> tuple[int, int] | None:
        t = self.spec.get("transition")
        return tuple(t) if t else None

    def classifier(self):
        """The classifier editor's latent classifier, rebuilt from its tensors once."""
        if self._classifier is None:
            from factory.latent.editors.classifier import load_classifier

            self._classifier = load_classifier(self)
        return self._classifier

    def displacement(self, z: torch.Tensor, target: torch.Tensor | None = None, check=None) -> torch.Tensor:
        """The per-unit-alpha step D(z): the edit is z + alpha*D(z).

        Direction: the unit vector u. Wasserstein: H(z) (z + alpha_fit*H(z) is the
        fitted transport). Classifier: (z* - z) / alpha_fit, z* the guided code,
        so alpha = the spec's alpha gives z* and other alphas scale the step.
        Clone: the cloned (or erased) code minus z.
        """
        return self._step(z, target, check)[0]

    def _step(self, z: torch.Tensor, target: torch.Tensor | None = None,
              check=None, place_check=None) -> tuple[torch.Tensor, list | None, list | None]:
        """D(z), and per code why the editor left it unchanged and what its edit did (clone
        only: see :meth:`clone`; None for the others, which move every code)."""
        table = _table()
        if self.editor not in table:
            raise FactoryError(f"unknown editor {self.editor!r}; known: {', '.join(table)}")
        return table[self.editor].step(self, z.float(), target, check, place_check)

    def clone(self, z: torch.Tensor, check=None, place_check=None) -> tuple[torch.Tensor, list[str | None], list]:
        """The clone editor's edit of each code (:func:`factory.latent.editors.clone.clone_codes`)."""
        from factory.latent.editors.clone import clone_codes

        return clone_codes(self, z, check, place_check)

    def edit(self, z: torch.Tensor, alpha: float | torch.Tensor, radius: float | None = None,
             target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z', projected): z + alpha*D(z), projected back into the latent ball of ``radius``."""
        result = self.edit_with_reasons(z, alpha, radius, target)
        return result.z, result.projected

    def edit_with_reasons(self, z: torch.Tensor, alpha: float | torch.Tensor, radius: float | None = None,
                          target: torch.Tensor | None = None, check=None, place_check=None) -> "EditResult":
        """:meth:`edit`, with per code None or why the editor left it unchanged (the clone editor
        refuses codes with no object to copy or no room, or, with a ``check``, none of whose
        tries passed it) and what the edit did (the clone editor's moves; None for the others)."""
        a = torch.as_tensor(alpha, dtype=torch.float32, device=z.device)
        a = a[:, None] if a.ndim == 1 else a
        step, reasons, moves = self._step(z, target, check, place_check)
        z_new, projected = project_to_ball(z.float() + a * step, radius)
        none = [None] * len(z)
        return EditResult(z_new, projected, reasons if reasons is not None else none,
                          moves if moves is not None else none)


class EditResult(NamedTuple):
    """An edit of a batch of codes: the edited codes, which were projected back into the latent
    ball, per code why the editor left it unchanged (None: edited), and per code what the edit
    did where the editor says (the clone editor's CloneMove; None for the affine editors)."""

    z: torch.Tensor
    projected: torch.Tensor
    reasons: list
    moves: list


def check_editor_attribute(editor: str, attribute: str) -> None:
    """The clone editor edits counts only: a FactoryError for any other attribute (the recipe
    schema and library callers of :func:`make_spec` get the same message)."""
    if editor in ("clone", "slot") and attribute != "count":
        raise FactoryError(f"editor {editor} edits counts only: set attribute: count (got {attribute!r}), or use "
                           f"balanced_centroid, centroid, wasserstein or classifier for attributes")


def make_spec(editor: str, attribute: str, *, generator: str | None = None, labeller: str | None = None,
              direction: int = 1, transition: tuple[int, int] | None = None, n_fit: int = 10000,
              fit_seed: int = 0, n0: int = 1000, confidence: float = 0.9, oversample: bool = False,
              alpha: float = 2.0, hyper: dict | None = None, fit_data: str | None = None) -> dict:
    """The full, canonical spec of one fitted edit: only what decides it, every default filled in
    (so equal edits share a cache entry and a changed hyper-parameter refits)."""
    table = _table()
    if editor not in table:
        raise FactoryError(f"unknown editor {editor!r}; known: {', '.join(table)}")
    if not table[editor].labelled:
        raise FactoryError(f"editor {editor} is not fitted on labelled codes: make its spec with "
                           f"{table[editor].module}.{editor}_spec")
    defaults = table[editor].hyper
    unknown = set(hyper or {}) - set(defaults)
    if unknown:
        known = sorted(defaults) or "none"
        raise FactoryError(f"unknown {editor} hyper-parameters {sorted(unknown)}; known: {known}")
    spec = {"version": ARTEFACT_VERSION, "editor": editor, "generator": generator, "labeller": labeller,
            "attribute": attribute, "direction": int(direction), "n_fit": int(n_fit), "fit_seed": int(fit_seed)}
    if fit_data:  # only when set, so the keys of edits fitted on prior samples stay as they were
        spec["fit_data"] = str(fit_data)
    check_editor_attribute(editor, attribute)
    if attribute == "count" and editor != "classifier":  # a classifier's count head serves every transition
        if transition is None:
            raise FactoryError(f"a {editor} count edit is fitted per transition: give transition=(n, n+1)")
        spec["transition"] = [int(transition[0]), int(transition[1])]
    if editor != "classifier":
        spec["confidence"] = float(confidence)
    if editor == "balanced_centroid":
        spec.update(n0=int(n0), oversample=bool(oversample))
    if editor in ("wasserstein", "classifier"):
        spec["alpha"] = float(alpha)
    # Values take their default's type: a recipe's 256.0 and the default 256 are one key.
    spec["hyper"] = {k: type(v)((hyper or {}).get(k, v)) for k, v in defaults.items()}
    return spec


def artefact_key(spec: dict, codes: LabelledCodes | None = None) -> str:
    """sha256 of the spec and of what the codes come from: the generator's and labeller's
    files, or the codes themselves when they are given."""
    if codes is not None:
        inputs = {"codes": codes.fingerprint()}
    else:
        # (The continuous controls have no labeller: their key holds the generator's files only.)
        inputs = {k: model_fingerprint(spec[k]) for k in ("generator", "labeller") if k in spec}
        # The files decide, not how their path was spelt: ./models/x and a copy of it share a key.
        spec = {k: v for k, v in spec.items() if k not in ("generator", "labeller")}
    blob = json.dumps({"spec": spec, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _artefact_stem(spec: dict, key: str) -> str:
    if "factor" in spec:
        return f"{spec['editor']}-{spec['factor']}-{key[:16]}"
    what = spec["attribute"] if "transition" not in spec else f"count{spec['transition'][0]}to{spec['transition'][1]}"
    if spec["attribute"] != "count":
        what += "+" if spec["direction"] > 0 else "-"
    return f"{spec['editor']}-{what}-{key[:16]}"


def save_artefact(art: EditArtefact, cache_dir: str | Path) -> str:
    from safetensors.torch import save_file

    folder = Path(os.path.expanduser(str(cache_dir)))
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / _artefact_stem(art.spec, art.id)
    tensors = {k: v.detach().cpu().contiguous() for k, v in art.tensors.items()}
    _atomic(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
    # The JSON goes last: its presence says the tensors beside it are complete.
    meta = {"id": art.id, "spec": art.spec, "stats": art.stats}
    _atomic(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=_jsonable)))
    art.path = str(stem.with_suffix(".json"))
    return art.path


def load_artefact(path: str | Path) -> EditArtefact:
    """An artefact from its .json (the tensors lie beside it)."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(path)))
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    tensors_path = path.with_suffix(".safetensors")
    if not path.is_file() or not tensors_path.is_file():
        raise FactoryError(f"edit artefact {path} is missing or incomplete; delete it and fit again "
                           f"(the edit stage fits it when its cache holds none)")
    meta = json.loads(path.read_text())
    return EditArtefact(meta["id"], meta["spec"], load_file(str(tensors_path)), meta["stats"], str(path), True)


def fit_artefact(spec: dict, codes: LabelledCodes | None, key: str, device: str = "cpu") -> EditArtefact:
    """Fit the edit a spec describes on labelled codes (no caching; the continuous controls
    need none)."""
    t0 = time.perf_counter()
    table = _table()
    if spec["editor"] not in table:
        raise FactoryError(f"unknown editor {spec['editor']!r}; known: {', '.join(table)}")
    family = table[spec["editor"]]
    tensors, stats = family.fit(spec, codes) if family.labelled else family.fit(spec, None, device)
    stats["fit_seconds"] = round(time.perf_counter() - t0, 2)
    return EditArtefact(key, spec, tensors, stats)


def fit_or_load(spec: dict, cache_dir: str | Path = DEFAULT_CACHE, codes: LabelledCodes | None = None,
                device: str = "cpu") -> EditArtefact:
    """The artefact of ``spec`` from ``cache_dir`` if it was fitted before, else fitted and saved.

    Without ``codes`` the spec's generator and labeller label ``n_fit`` codes
    (cached too). Loading a cached artefact does no fitting and loads no model.
    """
    key = artefact_key(spec, codes)
    folder = Path(os.path.expanduser(str(cache_dir)))
    path = folder / f"{_artefact_stem(spec, key)}.json"
    if path.is_file() and path.with_suffix(".safetensors").is_file():
        return load_artefact(path)
    if codes is None and _table()[spec["editor"]].labelled:
        if not spec.get("generator") or not spec.get("labeller"):
            raise FactoryError("fitting an edit needs labelled codes, or a spec with a generator and a labeller")
        codes = labelled_codes(spec["generator"], spec["labeller"], spec["n_fit"], spec["fit_seed"], folder, device,
                               data=spec.get("fit_data"))
    art = fit_artefact(spec, codes, key, device)
    save_artefact(art, folder)
    return art
