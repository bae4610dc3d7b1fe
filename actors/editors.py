"""Latent edits: move each sample's code along a fitted direction or map and synthesise it again.

One stage, ``edit``, five editors (DESIGN §1 item 3; the maths is in
:mod:`factory.latent.editors`):

    balanced_centroid  z + alpha*u, u from balanced positive/negative halves (the default)
    centroid           the same from all confident codes (the unbalanced baseline)
    wasserstein        z + alpha*H(z), H an affine map fitted under a Sinkhorn divergence
    classifier         gradient steps on a latent classifier (the Latent Transformer-style baseline)
    clone              count edits only: copy one object's cells of a spatial code to free space
                       (+1) or erase them (-1); the non-affine editor (factory.latent.clone).
                       It tries up to `tries` edits per code and keeps the one the labeller
                       is surest holds the target count

Attribute edits switch one of the labeller's attributes on (direction +1) or
off (-1); count edits add (change +1) or remove (-1) one object, from the
labeller's count of the sample's own G(z). Directions and maps are fitted once
per recipe by :meth:`LatentEditor.prepare` in the driver (or loaded from the
cache), never per actor or batch.

The labels an edit promises are checked by the independent `check_edit` stage;
the labeller that taught the editor never grades it. An edit drops the source's
object labels (points, boxes, digits, sizes, density map), which no longer
describe the image, except where a count edit knows which object it copied or
erased and where to (the clone editor at alpha 1): those move with the object,
and the density map is made again from the points.
"""
from __future__ import annotations

import base64
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, Field, field_validator, model_validator

from factory.errors import FactoryError
from factory.latent.editors import DEFAULT_CACHE, EDITORS, FACTORS, HYPER_DEFAULTS, check_editor_attribute
from factory.masks import drop_mask
from factory.sample import Sample, encode_image
from factory.stage import Resources, Stage, _default_device, register

COUNT = "count"
ALL = "all"  # every attribute the labeller knows, each switched on and off: one per variant
SWEEP_KEYS = ("attribute", "direction", "change", "alpha", "editor")
VARIANT = re.compile(r"-(\d+)$")
# Labels with one entry per object (the point's): carried with the points by a count edit
# that says which object it copied or erased, dropped otherwise.
PER_OBJECT = ("boxes", "digits", "sizes")
# Attributes that follow from the objects' number or sizes: a count edit changes them.
OBJECT_ATTRIBUTES = ("many_objects", "large_objects")


def _number(v, name: str) -> float:
    """A real number, or a ValueError that says what the field means (pydantic would coerce "2")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number (the edit strength, e.g. 2.0), got {v!r} "
                         f"({type(v).__name__}); write it without quotes")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}; to remove an attribute use "
                         f"direction: -1 (counts: change: -1)")
    return float(v)


class EditParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generator: str = Field("models/latent-ae", description="generator with a latent space (folder or hub id)")
    labeller: str = Field("models/attr-labeller", description="attribute classifier that labels the fitting codes")
    editor: str = Field("balanced_centroid", description=" | ".join(EDITORS))
    attribute: str | None = Field(
        None, description="an attribute the labeller knows (e.g. warm_objects), or 'count' (every editor but "
                          "continuous, which takes factor)")
    direction: int = Field(1, description="+1 switches the attribute on, -1 off")
    change: int = Field(1, description="count edits: +1 adds one object, -1 removes one")
    alpha: float = Field(2.0, description="edit strength: z + alpha*u; wasserstein/classifier edits are fitted at it")
    variants_alpha: list[float] | None = Field(
        None, description="alphas swept over a source's variants (variant i gets variants_alpha[i % len])")
    n_fit: int = Field(10000, ge=100, le=1_000_000, description="N: codes sampled and labelled to fit on")
    n0: int = Field(1000, ge=2, description="N0: balanced sample size (balanced_centroid)")
    confidence: float = Field(0.9, gt=0.5, lt=1.0, description="keep codes with max(p, 1-p) above on every attribute")
    oversample: bool = Field(False, description="balanced_centroid: draw rare cells with replacement up to their quota")
    fit_seed: int = Field(0, ge=0, description="seed of the fitting codes and of the balanced draw")
    fit_data: str | None = Field(
        None, description="fit on codes of these images brought in by the generator's encoder (world:SPLIT:N, a "
                          "shard folder, fsc147:PATH; up to n_fit of them) instead of n_fit prior samples")
    source_counts: list[int] | None = Field(
        None, description="count edits: the source counts to fit transitions for (default: every count the "
                          "fitting codes have enough of)")
    hyper: dict[str, float] = Field(default_factory=dict, description="editor hyper-parameters (see HYPER_DEFAULTS)")
    # The artefact cache is shared by every run on the machine, not kept under one run's
    # output: fitting is the costly part, the key holds every input (spec + model file
    # hashes), so a second recipe with the same edit reuses it. On a cluster, point it
    # at a shared filesystem so actors on other nodes find what the driver fitted.
    sweep: list[dict[str, Any]] | None = Field(
        None, description="one edit per variant: variant i applies sweep[i % len] (keys: attribute, direction, "
                          "change, alpha, editor) over these params; `attribute: all` sweeps every attribute both ways")
    # editor: continuous (calibrated continuous controls, factory.latent.editors.continuous)
    factor: str | None = Field(None, description="continuous: " + " | ".join(FACTORS))
    shift: float | None = Field(None, description="continuous: change the factor by this much (px for shifts, a "
                                                  "scale factor for zoom, a mean-intensity change for brightness)")
    value: float | None = Field(None, description="continuous: set the factor to this (ink barycentre px, size "
                                                  "relative to the generator's mean, mean intensity)")
    distribution: dict[str, Any] | None = Field(
        None, description="continuous: draw each sample's value from {uniform: [lo, hi]}, {range: [lo, hi]} or "
                          "{histogram: {edges: [...], weights: [...]}}")
    span: float | None = Field(None, description="continuous: the trajectories' range, +-span (zoom: x/ span); "
                                                 "default per factor")
    refine: int = Field(20, ge=0, le=1000, description="continuous: Adam steps per stage of the warm-started "
                                                       "inversion that refines each edit (0: the direction alone)")
    tolerance: float | None = Field(
        None, description="continuous: fail samples whose measured change differs from what the pixel transform "
                          "gives by more (factor units; default per factor; 0 turns the check off)")
    cache: str = Field(DEFAULT_CACHE, description="folder of fitted directions/maps, reused across runs")
    artefact: str | list[str] | None = Field(
        None, description="fitted artefact .json path(s); filled in by prepare, leave unset")

    @field_validator("editor", mode="before")
    @classmethod
    def _editor(cls, v):
        from factory.recipe import check_choice

        return check_choice(v, EDITORS, "editor")

    @field_validator("factor")
    @classmethod
    def _factor(cls, v):
        if v is None:
            return v
        from factory.recipe import check_choice

        return check_choice(v, FACTORS, "factor (the continuous editor has directions for these)")

    @field_validator("shift", "value", "span", "tolerance", mode="before")
    @classmethod
    def _real(cls, v, info):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be a finite number, got {v!r}")
        return float(v)

    @field_validator("distribution")
    @classmethod
    def _distribution(cls, v):
        if v is None:
            return v
        return check_distribution(v)

    @field_validator("fit_data")
    @classmethod
    def _fit_data(cls, v):
        if v is None:
            return v
        if v.startswith("world:"):
            parts = v.split(":")
            if len(parts) not in (3, 4) or parts[1] not in ("train", "test") or not all(x.isdigit() for x in parts[2:]):
                raise ValueError(f"fit_data {v!r}: write world:SPLIT:N[:START] with SPLIT train or test, "
                                 f"e.g. world:train:5000")
            return v
        path = v[len("fsc147:"):].partition(":")[0] if v.startswith("fsc147:") else v
        if not Path(os.path.expanduser(path)).is_dir():
            raise ValueError(f"fit_data {v!r}: {path} is not a folder; give a shard folder, fsc147:PATH or "
                             f"world:SPLIT:N")
        return v

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, v):
        return _number(v, "alpha")

    @field_validator("variants_alpha", mode="before")
    @classmethod
    def _variants_alpha(cls, v):
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"variants_alpha must be a non-empty list of numbers, e.g. [1.0, 2.0, 3.0], got {v!r}")
        return [_number(a, "every variants_alpha entry") for a in v]

    @field_validator("direction", "change", mode="before")
    @classmethod
    def _sign(cls, v, info):
        if isinstance(v, bool) or v not in (1, -1):
            raise ValueError(f"{info.field_name} must be +1 or -1, got {v!r}")
        return int(v)

    @field_validator("generator")
    @classmethod
    def _generator(cls, v):
        from factory.latent.generator import check_generator_ref

        return check_generator_ref(v)

    @field_validator("labeller")
    @classmethod
    def _labeller(cls, v):
        from factory.latent.attributes import read_config
        from factory.recipe import check_model_ref

        check_model_ref(v)
        if Path(os.path.expanduser(v)).exists():
            try:
                cfg = read_config(os.path.expanduser(v))
            except FactoryError as e:
                raise ValueError(str(e)) from None
            if cfg.get("arch") == "checker":
                # The checker grades edits (check_edit); an editor taught by it would be
                # graded by its own teacher, and its success rate would mean nothing.
                raise ValueError(f"{v} is the independent attribute checker; label latents with a labeller "
                                 f"(e.g. models/attr-labeller) so `check_edit` stays independent")
        return v

    @field_validator("attribute")
    @classmethod
    def _attribute(cls, v, info):
        # A field validator (not the model one) so a bad attribute is reported beside any
        # other bad field; the labeller is validated first (field order) when it is valid.
        from factory.latent.attributes import check_attribute_name

        if v is None or v in (COUNT, ALL):
            return v
        labeller = info.data.get("labeller")
        folder = os.path.expanduser(labeller) if labeller else None
        try:
            check_attribute_name(v, folder if folder and Path(folder).exists() else None)
        except FactoryError as e:
            raise ValueError(f"{e} (or 'count' for count edits)") from None
        return v

    @model_validator(mode="after")
    def _consistent(self):
        from factory.latent.attributes import read_config

        if self.editor == CONTINUOUS:
            check_continuous(self)
            return self
        given = [k for k in CONTINUOUS_ONLY if getattr(self, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only editor continuous takes "
                             f"{'it' if len(given) == 1 else 'them'}")
        if self.editor == SLOT:
            check_slot(self)
            return self
        if self.attribute is None:
            raise ValueError("attribute is missing: name an attribute the labeller knows, or 'count' "
                             "(editor continuous takes factor instead)")
        if self.attribute != COUNT:
            if self.source_counts is not None:
                raise ValueError("source_counts is for count edits (attribute: count)")
        elif self.source_counts is not None:
            folder = os.path.expanduser(self.labeller)
            counts = read_config(folder)["counts"] if Path(folder).exists() else list(range(1, 13))
            bad = [n for n in self.source_counts if n not in counts or n + self.change not in counts]
            if bad:
                raise ValueError(f"source_counts {bad}: a count and the count {'+' if self.change > 0 else '-'}1 "
                                 f"it becomes must both be among the labeller's counts {counts[0]}-{counts[-1]}")
        if self.sweep is None:
            try:
                check_editor_attribute(self.editor, self.attribute)
            except FactoryError as e:
                raise ValueError(str(e)) from None
        if self.editor == "clone":
            from factory.latent.generator import KIND_RAE, _local, generator_kind

            local = _local(self.generator)
            if local is not None and generator_kind(local) != KIND_RAE:
                raise ValueError(f"editor clone needs a generator whose code has a spatial grid (a latent-ae "
                                 f"folder); {self.generator} is a StyleGAN-family generator: use wasserstein or "
                                 f"classifier for its count edits")
        if self.attribute == ALL and self.sweep is None:
            self.sweep = [{"attribute": a, "direction": d} for a in _labeller_attributes(self.labeller) for d in (1, -1)]
        if self.sweep is not None:
            if not self.sweep:
                raise ValueError("sweep is empty: give one entry per edit, e.g. [{attribute: warm_objects}]")
            for i, entry in enumerate(self.sweep):
                bad = set(entry) - set(SWEEP_KEYS) - {"artefact"}  # artefact: filled in by prepare
                if bad:
                    raise ValueError(f"sweep[{i}] has {sorted(bad)}; a sweep entry may set {', '.join(SWEEP_KEYS)}")
                try:
                    self.entry(i)
                except ValidationError as e:
                    msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
                                     for err in e.errors())
                    raise ValueError(f"sweep[{i}]: {msgs}") from None
            return self
        if self.attribute == ALL:
            raise ValueError("attribute: all and a sweep cannot be combined; list the edits in sweep")
        unknown = set(self.hyper) - set(HYPER_DEFAULTS[self.editor])
        if unknown:
            known = ", ".join(sorted(HYPER_DEFAULTS[self.editor])) or "none"
            raise ValueError(f"unknown {self.editor} hyper-parameters {sorted(unknown)}; known: {known}")
        if self.editor == "clone":
            # Counts of cells and of tries: whole numbers, at least 1 (gap and margin may be 0);
            # pixel_gap is px of background (0: no pixel rule), any number >= 0.
            for k, v in self.hyper.items():
                if k == "pixel_gap":
                    if v < 0:
                        raise ValueError(f"clone hyper-parameter pixel_gap is px of background between a copy "
                                         f"and the other objects (the world keeps 3; 0 turns the rule off), got {v}")
                    continue
                least = 0 if k in ("gap", "margin") else 1
                if v != int(v) or v < least:
                    raise ValueError(f"clone hyper-parameter {k} must be a whole number >= {least}, got {v}")
        return self


    def entry(self, i: int) -> "EditParams":
        """The params of sweep entry i: these params with the entry's keys over them."""
        base = self.model_dump(exclude={"sweep", "artefact"})
        entry = self.sweep[i]
        return EditParams(**{**base, **{k: v for k, v in entry.items() if k != "artefact"},
                             "artefact": entry.get("artefact")})


CONTINUOUS = "continuous"
SLOT = "slot"
CONTINUOUS_ONLY = ("factor", "shift", "value", "distribution", "span", "tolerance")
# The measured change may miss the requested one by this much before the sample fails (px, scale
# factor, mean intensity): about three times the spread the refined edits show (README).
DEFAULT_TOLERANCE = {"x_shift": 1.5, "y_shift": 1.5, "zoom": 0.1, "brightness": 0.03}


def check_distribution(v: dict) -> dict:
    """{uniform: [lo, hi]}, {range: [lo, hi]} or {histogram: {edges, weights}}, or a ValueError."""
    example = "write {uniform: [-6, 6]} or {histogram: {edges: [-6, 0, 6], weights: [1, 3]}}"
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in ("uniform", "range", "histogram"):
        raise ValueError(f"distribution must have one key, uniform, range or histogram: {example}")
    kind, spec = next(iter(v.items()))
    if kind in ("uniform", "range"):
        if (not isinstance(spec, (list, tuple)) or len(spec) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec)
                or not spec[0] < spec[1]):
            raise ValueError(f"distribution {kind} is [lo, hi] with lo < hi, got {spec!r}")
        return {kind: [float(spec[0]), float(spec[1])]}
    if not isinstance(spec, dict) or set(spec) != {"edges", "weights"}:
        raise ValueError(f"a histogram distribution has edges and weights: {example}")
    edges, weights = spec["edges"], spec["weights"]
    nums = lambda xs: isinstance(xs, list) and all(  # noqa: E731
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in xs)
    if not nums(edges) or not nums(weights) or len(edges) != len(weights) + 1 or len(weights) < 1:
        raise ValueError(f"a histogram has one more edge than weights, numbers only: {example}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"histogram edges must increase, got {edges}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"histogram weights must be >= 0 with a positive sum, got {weights}")
    return {"histogram": {"edges": [float(x) for x in edges], "weights": [float(x) for x in weights]}}


def check_slot(p: "EditParams") -> None:
    """editor slot: count edits (+1 / -1) on a generator with slots, with whole-number tries."""
    from factory.latent.editors.slot import HYPER
    from factory.latent.generator import KIND_SLOTS, _local, generator_kind

    if p.attribute != COUNT:
        raise ValueError(f"editor slot edits counts only: set attribute: count (got {p.attribute!r})")
    if p.sweep is not None:
        raise ValueError("editor slot takes no sweep: one count edit (change +1 or -1) per stage")
    local = _local(p.generator)
    if local is not None:
        try:
            kind = generator_kind(local)
        except FactoryError as e:
            raise ValueError(str(e)) from None
        if kind != KIND_SLOTS:
            raise ValueError(f"editor slot switches object slots on and off, but {p.generator} is a {kind} "
                             f"generator with no slots: give a folder written by `factory train slots` "
                             f"(e.g. models/slots), or use editor clone for a latent-ae")
    unknown = set(p.hyper) - set(HYPER)
    if unknown:
        raise ValueError(f"unknown slot hyper-parameters {sorted(unknown)}; known: {', '.join(sorted(HYPER))}")
    tries = p.hyper.get("tries", HYPER["tries"])
    if tries != int(tries) or tries < 1:
        raise ValueError(f"slot hyper-parameter tries is the number of free places tried, a whole number >= 1, "
                         f"got {tries}")
    if p.hyper.get("pixel_gap", 0) < 0:
        raise ValueError(f"slot hyper-parameter pixel_gap is px of background (0 turns the rule off), got "
                         f"{p.hyper['pixel_gap']}")
    if p.source_counts is not None and any(n < 1 for n in p.source_counts):
        raise ValueError(f"source_counts {p.source_counts}: counts of objects are whole numbers >= 1")


def check_continuous(p: "EditParams") -> None:
    """The continuous editor's params, or a ValueError saying what to fix (before any model loads)."""
    from factory.latent.editors.continuous import check_factor

    if p.attribute is not None or p.sweep is not None:
        raise ValueError("editor continuous moves a factor: give factor (" + ", ".join(FACTORS) + ") and one of "
                         "shift, value or distribution, not attribute or sweep")
    if p.factor is None:
        raise ValueError(f"editor continuous needs factor: one of {', '.join(FACTORS)}")
    f = check_factor(p.factor)
    ops = [k for k in ("shift", "value", "distribution") if getattr(p, k) is not None]
    if len(ops) != 1:
        raise ValueError(f"editor continuous takes exactly one of shift, value or distribution; got "
                         f"{', '.join(ops) if ops else 'none'}")
    span = f.span if p.span is None else p.span
    if (span <= 1) if f.multiplicative else (span <= 0):
        raise ValueError(f"span of {f.name} must be {'> 1 (a scale factor)' if f.multiplicative else '> 0'}, "
                         f"got {span}")
    if p.shift is not None:
        if f.multiplicative and p.shift <= 0:
            raise ValueError(f"a zoom shift is a scale factor > 0 (1.2: 20 % larger), got {p.shift}")
        if abs(float(f.internal(p.shift))) > float(f.internal(span)) + 1e-9:
            lo, hi = (1 / span, span) if f.multiplicative else (-span, span)
            raise ValueError(f"shift {p.shift:g} is beyond the fitted range of {f.name}, {lo:.3g} to {hi:.3g} "
                             f"{f.unit} (span {span:g}): raise span to fit a wider range")
    values = ([p.value] if p.value is not None else
              list(_distribution_bounds(p.distribution)) if p.distribution is not None else [])
    if f.multiplicative and any(v <= 0 for v in values):
        raise ValueError(f"zoom values are sizes relative to the generator's mean (1.0), > 0; got {values}")
    if f.name == "brightness" and any(not 0 <= v <= 1 for v in values):
        raise ValueError(f"brightness values are mean intensities in [0, 1], got {values}")
    unknown = set(p.hyper) - set(HYPER_DEFAULTS[CONTINUOUS])
    if unknown:
        raise ValueError(f"unknown continuous hyper-parameters {sorted(unknown)}; known: "
                         f"{', '.join(sorted(HYPER_DEFAULTS[CONTINUOUS]))}")


def _distribution_bounds(d: dict) -> tuple[float, float]:
    if "histogram" in d:
        return d["histogram"]["edges"][0], d["histogram"]["edges"][-1]
    return tuple(d.get("uniform", d.get("range")))


def _labeller_attributes(labeller: str) -> list[str]:
    from factory.latent.attributes import ATTRIBUTES, read_config

    folder = os.path.expanduser(labeller)
    return list(read_config(folder).get("attributes", ATTRIBUTES)) if Path(folder).exists() else list(ATTRIBUTES)


def _spec(p: EditParams, transition: tuple[int, int] | None = None) -> dict:
    from factory.latent.editors import make_spec

    return make_spec(p.editor, p.attribute, generator=p.generator, labeller=p.labeller, direction=p.direction,
                     transition=transition, n_fit=p.n_fit, fit_seed=p.fit_seed, n0=p.n0,
                     confidence=p.confidence, oversample=p.oversample, alpha=p.alpha, hyper=p.hyper,
                     fit_data=p.fit_data)


def fit_artefacts(p: EditParams, device: str = "cpu") -> list:
    """Every artefact the params need, fitted or loaded from the cache: one for an attribute edit
    or a classifier, one per count transition otherwise (only those asked for)."""
    from factory.latent.editors import count_transitions, fit_or_load, labelled_codes

    if p.editor == SLOT:
        return []  # nothing to fit: the editor reads presence from the code
    if p.editor == CONTINUOUS:
        from factory.latent.editors.continuous import continuous_spec

        spec = continuous_spec(p.factor, p.generator, span=p.span, fit_seed=p.fit_seed, hyper=p.hyper)
        return [fit_or_load(spec, p.cache, device=device)]
    if p.attribute != COUNT or p.editor == "classifier":
        return [fit_or_load(_spec(p), p.cache, device=device)]
    if p.source_counts is not None:
        transitions = [(n, n + p.change) for n in p.source_counts]
    else:
        codes = labelled_codes(p.generator, p.labeller, p.n_fit, p.fit_seed, p.cache, device, data=p.fit_data)
        transitions = count_transitions(codes, p.change, p.confidence)
        if not transitions:
            raise FactoryError(f"no count transition has enough confident codes among {p.n_fit}: raise n_fit "
                               f"or lower confidence (now {p.confidence})")
    return [fit_or_load(_spec(p, t), p.cache, device=device) for t in transitions]


def _same_generator(a: str, b: str) -> bool:
    """Model ids are "kind:ref"; two spellings of one local path are the same generator."""
    def norm(mid: str) -> str:
        kind, _, ref = mid.partition(":")
        local = Path(os.path.expanduser(ref))
        return f"{kind}:{local.resolve() if local.exists() else ref}"

    return a == b or norm(a) == norm(b)


@register
class LatentEditor(Stage):
    name = "edit"
    Params = EditParams
    needs = frozenset({"latent"})
    provides = frozenset({"image"})
    # memory: peak RSS 943 MB with the shipped latent-ae and labeller (benchmarks/stage_memory.py), +25 %
    resources = Resources(num_cpus=0.5, num_gpus=0.25, memory=int(1.1875 * 2**30))
    batch_size = 32

    @classmethod
    def prepare(cls, params: dict, context: dict) -> dict:
        """Fit (or load) the edit once in the driver; the actors get the artefact paths."""
        p = cls.Params(**params)
        if p.sweep is not None:
            sweep = []
            for i, entry in enumerate(p.sweep):
                sub = p.entry(i)
                paths = sub.artefact or [a.path for a in fit_artefacts(sub, _default_device())]
                sweep.append({**entry, "artefact": paths})
            return {**params, "sweep": sweep}
        if p.artefact:
            return params
        arts = fit_artefacts(p, _default_device())
        return {**params, "artefact": [a.path for a in arts]}

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        import torch

        from factory.latent.generator import load_generator

        self.torch = torch
        p = self.params
        if p.sweep is not None:
            # One editor per sweep entry; variant i of a source goes to entry i % len.
            self.subs = [LatentEditor(p.entry(i).model_dump(), self.device, context) for i in range(len(p.sweep))]
            self.generator = self.subs[0].generator
            return
        self.subs = None
        self.generator = load_generator(p.generator, self.device)
        self.radius = self.generator.latent_radius()
        self.labeller = None
        if p.attribute == COUNT and p.editor != SLOT:  # the source count of each code is the labeller's count of G(z)
            from factory.latent.attributes import AttributeClassifier

            self.labeller = AttributeClassifier.from_pretrained(os.path.expanduser(p.labeller), self.device)
        self.artefacts = self._artefacts()
        self.by_transition = {a.transition: a for a in self.artefacts}

    def _artefacts(self) -> list:
        from factory.latent.editors import load_artefact

        p = self.params
        paths = [p.artefact] if isinstance(p.artefact, str) else (p.artefact or [])
        if paths and all(Path(os.path.expanduser(x)).is_file() for x in paths):
            return [load_artefact(x) for x in paths]
        if paths:
            # An actor on another node than the driver that fitted: the same spec gives the
            # same artefact, so fit (or find it in this node's cache) rather than fail.
            print(f"edit: artefact {paths[0]} is not on this node; fitting it here (share `cache` to avoid this)",
                  file=sys.stderr)
        return fit_artefacts(p, self.device)

    # --- per batch -----------------------------------------------------------------

    def process(self, samples: list[Sample]) -> None:
        if self.subs is not None:
            groups: dict[int, list[Sample]] = {}
            for s in samples:
                m = VARIANT.search(s.key)
                groups.setdefault(int(m.group(1)) % len(self.subs) if m else 0, []).append(s)
            for i, group in groups.items():
                self.subs[i].process(group)
            return
        ready = self.usable(samples)
        if not ready:
            return
        try:
            self._edit(ready)
        except Exception as e:  # noqa: BLE001 - the batch fails with its reason, the run goes on
            for s in ready:
                if s.alive:
                    s.fail(self.name, f"{type(e).__name__}: {e}")

    def unusable(self, s: Sample) -> str | None:
        lat = s.meta.get("latent")
        if not isinstance(lat, dict) or not lat.get("z"):
            return ("no latent code (meta.latent.z): add `- name: sample_latent` for a `latents` source, "
                    "or `- name: invert` for real images, before `edit`")
        if len(lat["z"]) != self.generator.latent_dim:
            return (f"the code has {len(lat['z'])} values but {self.generator.model_id} takes "
                    f"{self.generator.latent_dim}: invert with the editing generator")
        if lat.get("generator") and not _same_generator(lat["generator"], self.generator.model_id):
            return (f"the code is from {lat['generator']}, but this stage edits with {self.generator.model_id}: "
                    f"a code means nothing to another generator; use the same generator in both stages")
        return None

    def _alpha(self, s: Sample) -> float:
        alphas = self.params.variants_alpha
        if not alphas:
            return self.params.alpha
        m = VARIANT.search(s.key)
        return alphas[int(m.group(1)) % len(alphas)] if m else self.params.alpha

    def _synthesize(self, z):
        with self.torch.no_grad():
            return self.generator.synthesize(z)

    def _edit(self, group: list[Sample]) -> None:
        from factory.latent.editors import count_check
        from factory.latent.inversion import to_uint8

        torch, p = self.torch, self.params
        if p.editor == CONTINUOUS:
            return self._edit_continuous(group)
        if p.editor == SLOT:
            return self._edit_slots(group)
        z = torch.tensor(np.array([s.meta["latent"]["z"] for s in group], np.float32), device=self.generator.device)
        need_g = p.attribute == COUNT or any(s.image is None for s in group)
        rendered = self._synthesize(z) if need_g else None
        alpha = torch.tensor([self._alpha(s) for s in group])
        if p.attribute == COUNT:
            # Counted on G(z) as the generator gives it, as the fitting codes were labelled.
            src = np.asarray(self.labeller.predict(rendered)["count"]).astype(int)
            tgt = src + p.change
            new = z.clone()
            projected = torch.zeros(len(group), dtype=torch.bool)
            arts = [None] * len(group)
            moves = [None] * len(group)
            for key in sorted({(int(a), int(b)) for a, b in zip(src, tgt)}):
                rows = [i for i in range(len(group)) if (src[i], tgt[i]) == key]
                art = self._artefact_for(key)
                if art is None:
                    for i in rows:
                        group[i].fail(self.name, self._no_transition(key))
                    continue
                idx = torch.tensor(rows)
                targets = torch.full((len(rows),), key[1])
                # The clone editor tries several copies and keeps the one the labeller is surest
                # adds the object; the other editors take no check.
                check = count_check(self.generator, self.labeller, targets.numpy()) if art.editor == "clone" else None
                result = art.edit_with_reasons(z[idx], alpha[idx], self.radius, targets, check,
                                               self._place_check(art))
                new[idx], projected[idx] = result.z.detach(), result.projected.cpu()
                # A code the editor left unchanged (the clone editor: no object small enough to
                # copy, or no free place) is a failure with its reason, not a silent copy.
                for i, why, move in zip(rows, result.reasons, result.moves):
                    if why:
                        group[i].fail(self.name, f"{art.editor} editor: {why}")
                    arts[i], moves[i] = art, move
        else:
            art = self.artefacts[0]
            new, projected = art.edit(z, alpha, self.radius)
            arts = [art] * len(group)
            src = tgt = moves = [None] * len(group)
        images = to_uint8(self._synthesize(new.detach()))
        before_images = to_uint8(rendered) if rendered is not None else None
        for i, s in enumerate(group):
            if not s.alive:
                continue
            before = s.image if s.image is not None else before_images[i]
            self._label(s, before, images[i], new[i], float(z[i].norm()), arts[i], float(alpha[i]),
                        bool(projected[i]), src[i], tgt[i], moves[i])

    def _edit_slots(self, group: list[Sample]) -> None:
        """Count edits on a slot generator: the source count is the code's present slots (no
        labeller); a code whose slots disagree with the sample's labelled count fails, since its
        labels could not be carried; the rest get one slot switched on or off."""
        from factory.latent.editors.slot import HYPER, slot_count, slot_edit
        from factory.latent.inversion import to_uint8

        p = self.params
        h = {**HYPER, **p.hyper}
        z = np.array([s.meta["latent"]["z"] for s in group], np.float32)
        src = slot_count(z, self.generator.layout)
        new, reasons, moves = slot_edit(self.generator.model, z, p.change, [s.seed for s in group],
                                        int(h["tries"]), float(h["pixel_gap"]))
        images = to_uint8(self._synthesize(self.torch.from_numpy(new)))
        # The image before the edit, where a sample has none (a sampled code): only then decoded.
        before = (to_uint8(self._synthesize(self.torch.from_numpy(z))) if any(s.image is None for s in group)
                  else [None] * len(group))
        for i, s in enumerate(group):
            labelled = s.meta.get("count")
            if p.source_counts is not None and src[i] not in p.source_counts:
                s.fail(self.name, f"slot editor: the code has {src[i]} objects, not one of source_counts "
                                  f"{p.source_counts}")
            elif labelled is not None and int(labelled) != src[i]:
                s.fail(self.name, f"slot editor: the code's slots hold {src[i]} objects but the label says "
                                  f"{labelled} (the inversion's decomposition is wrong), so the labels would "
                                  f"not hold after the edit")
            elif reasons[i]:  # slot_edit says why, e.g. no object to remove or no free place
                s.fail(self.name, f"slot editor: {reasons[i]}")
            if not s.alive:
                continue
            self._label(s, s.image if s.image is not None else before[i], images[i], self.torch.from_numpy(new[i]),
                        float(np.linalg.norm(z[i])), None, 1.0, False, src[i], src[i] + p.change, moves[i])

    def _edit_continuous(self, group: list[Sample]) -> None:
        """Each code's factor moved by the requested amount (shift), to a value, or to a value drawn
        from the requested distribution; measured from the pixels before and after; refined by
        warm-started inversion; failed where the change misses the request by more than the
        tolerance (the moved points and boxes would not describe the image)."""
        from factory.latent.editors.continuous import (FACTORS, factor_value, measure, refine_codes, refine_stages,
                                                       sample_distribution, shift_codes, transform)
        from factory.latent.inversion import to_uint8

        torch, p, art = self.torch, self.params, self.artefacts[0]
        f = FACTORS[p.factor]
        z = torch.tensor(np.array([s.meta["latent"]["z"] for s in group], np.float32), device=self.generator.device)
        before_x = self._synthesize(z)
        # The current value from the pixels of G(z): exact, where reading it through g assumes the
        # factor is a function of <u, z> (it is not for positions on a grid code; README).
        before = factor_value(p.factor, measure(before_x))
        mean0 = float(art.stats["value0_mean"])
        if p.shift is not None:
            want = None
            dt = np.full(len(group), float(f.internal(p.shift)))
        else:
            physical = (np.full(len(group), p.value) if p.value is not None
                        else sample_distribution(p.distribution, [s.seed for s in group]))
            want = self._internal_value(f, physical, mean0)
            dt = want - before
        new, reasons = shift_codes(art, z, dt)
        ok = np.array([r is None for r in reasons])
        dt = np.where(ok, dt, 0.0)
        if p.refine > 0 and ok.any():
            h = {**HYPER_DEFAULTS[CONTINUOUS], **art.spec.get("hyper", {})}
            new, _ = refine_codes(self.generator, z, new, p.factor, dt, refine_stages(art, dt), p.refine,
                                  float(h["lr"]), float(h["sigma"]))
        new = new.detach()
        after_x = self._synthesize(new)
        after = factor_value(p.factor, measure(after_x))
        # What the pixel transform itself gives, measured the same way: objects leaving the frame
        # move the barycentre less than the shift, and the zoom's ink area is cut at the frame.
        ideal = factor_value(p.factor, measure(*transform(before_x, p.factor, dt)))
        images = to_uint8(after_x)
        tol = DEFAULT_TOLERANCE[p.factor] if p.tolerance is None else p.tolerance
        for i, s in enumerate(group):
            if reasons[i]:
                s.fail(self.name, f"continuous editor: {reasons[i]}")
                continue
            requested, measured = self._physical_change(f, dt[i]), self._physical_change(f, after[i] - before[i])
            expected = self._physical_change(f, ideal[i] - before[i])
            if tol > 0 and abs(measured - expected) > tol:
                s.fail(self.name, f"continuous editor: {f.name} changed by {measured:.3g} {f.unit} where the pixel "
                                  f"transform of {requested:.3g} changes it by {expected:.3g} (tolerance {tol:g})")
                continue
            self._label_continuous(s, images[i], new[i], f, dt[i], requested, measured, expected,
                                   self._physical_value(f, before[i], mean0), self._physical_value(f, after[i], mean0),
                                   None if want is None else self._physical_value(f, want[i], mean0), art)

    @staticmethod
    def _internal_value(f, physical: np.ndarray, mean0: float) -> np.ndarray:
        """A requested value in the units g and the measurements use (zoom: relative size -> log size)."""
        return np.log(physical) + mean0 if f.multiplicative else np.asarray(physical, np.float64)

    @staticmethod
    def _physical_value(f, v: float, mean0: float) -> float:
        return float(math.exp(v - mean0)) if f.multiplicative else float(v)

    @staticmethod
    def _physical_change(f, dt: float) -> float:
        return float(math.exp(dt)) if f.multiplicative else float(dt)

    def _label_continuous(self, s: Sample, image: np.ndarray, z_new, f, dt: float, requested: float,
                          measured: float, expected: float, before: float, after: float, target, art) -> None:
        """The requested and the measured factor; points and boxes moved by the requested transform
        (objects it takes out of the frame leave the labels, and the count with them)."""
        p = self.params
        h, w = image.shape[:2]
        op = "shift" if p.shift is not None else "value" if p.value is not None else "distribution"
        edit = {"kind": "continuous", "editor": CONTINUOUS, "factor": f.name, "unit": f.unit, "op": op,
                "requested": {"change": round(requested, 4), **({"value": round(target, 4)} if target is not None else {})},
                "measured": {"before": round(before, 4), "after": round(after, 4), "change": round(measured, 4),
                             "pixel_transform_change": round(expected, 4)},
                "artefact": art.id[:16], "refine": p.refine}
        inversion = s.meta.get("inversion") or {}
        edit.update(inverter=inversion.get("method"), reconstruction_error=inversion.get("mse"))
        s.meta["latent"] = {**s.meta["latent"], "z": [float(v) for v in z_new.detach().cpu()],
                            "generator": self.generator.model_id}
        if f.name in ("x_shift", "y_shift", "zoom"):
            self._move_objects(s, f.name, dt, (h, w), edit)
        else:
            # Brightness changes colours: the attributes and the caption that name them no longer hold.
            if s.meta.get("attributes"):
                edit["source_attributes"] = s.meta.pop("attributes")
            if s.meta.get("caption"):
                edit["source_caption"] = s.meta.pop("caption")
        if f.name == "zoom" and isinstance(s.meta.get("attributes"), dict):
            s.meta["attributes"] = {k: v for k, v in s.meta["attributes"].items() if k != "large_objects"}
        s.meta["edit"] = edit
        s.image = image
        mask_dropped = drop_mask(s)
        s.add_op("edit", editor=CONTINUOUS, factor=f.name, **{op: getattr(p, op)}, span=art.spec["span"],
                 refine=p.refine, generator=self.generator.model_id, artefact=art.id[:16], fit_seed=p.fit_seed,
                 hyper=dict(art.spec.get("hyper", {})), **({"labels_dropped": mask_dropped} if mask_dropped else {}))

    @staticmethod
    def _move_objects(s: Sample, factor: str, dt: float, size: tuple[int, int], edit: dict) -> None:
        from factory.latent.editors.continuous import move_points

        points = s.meta.get("points")
        if not points:
            return
        moved, boxes, inside = move_points(points, s.meta.get("boxes"), factor, dt, size)
        keep = [i for i, ok in enumerate(inside) if ok]
        s.meta["points"] = [moved[i] for i in keep]
        if boxes is not None:
            s.meta["boxes"] = [boxes[i] for i in keep]
        for k in ("digits", "sizes"):
            if isinstance(s.meta.get(k), list) and len(s.meta[k]) == len(points):
                s.meta[k] = [s.meta[k][i] for i in keep]
        if len(keep) < len(points):
            edit["objects_left_frame"] = len(points) - len(keep)
        if "count" in s.meta:
            s.meta["count"] = len(keep)
        if s.density is not None:
            from factory.world.scenes import DENSITY_SIGMA, density_map

            s.density = density_map(s.meta["points"], size)
            edit["density"] = f"made from the moved points (Gaussian, sigma {DENSITY_SIGMA} px)"
        edit["labels_moved"] = True

    def _place_check(self, art):
        """The clone editor's pixel rule (copies drawn clear of the other objects), or None."""
        from factory.latent.editors import HYPER_DEFAULTS, pixel_gap_check

        if art.editor != "clone":
            return None
        gap = float({**HYPER_DEFAULTS["clone"], **art.spec.get("hyper", {})}.get("pixel_gap", 0))
        return pixel_gap_check(self.generator, gap) if gap > 0 else None

    def _artefact_for(self, transition: tuple[int, int]):
        if self.params.editor == "classifier":
            art = self.artefacts[0]
            counts = art.stats.get("counts", [])
            return art if transition[1] in counts else None
        return self.by_transition.get(transition)

    def _no_transition(self, key: tuple[int, int]) -> str:
        fitted = sorted(t[0] for t in self.by_transition if t) if self.params.editor != "classifier" else []
        if self.params.editor == "classifier":
            return f"the labeller counts {key[0]} objects; {key[1]} is outside the counts it knows"
        return (f"the labeller counts {key[0]} objects here, but no {key[0]} -> {key[1]} transition was fitted "
                f"(fitted source counts: {fitted or 'none'}); add {key[0]} to source_counts, or raise n_fit "
                f"so the fitting codes hold enough of them")

    def _carried(self, s: Sample, before: np.ndarray, image: np.ndarray, move, alpha: float,
                 projected: bool) -> tuple[tuple[list, dict] | None, str | None]:
        """A count edit's points and per-object labels (PER_OBJECT), carried over from the source
        where the editor says which object it copied or erased and by how much it moved (the
        clone editor, at alpha 1, unprojected: the edited code is then exactly a copy); else
        None and why (None when the source had no points to carry)."""
        points = s.meta.get("points")
        if not points:
            return None, None
        if move is None:
            return None, f"the {self.params.editor} editor does not say which object it added or removed"
        if self.params.editor == SLOT:
            from factory.latent.editors.slot import carry_labels

            carried = carry_labels(move, points, {k: s.meta.get(k) for k in PER_OBJECT})
            return (None, carried) if isinstance(carried, str) else (carried, None)
        if alpha != 1.0 or projected:
            why = f"alpha {alpha:g} is not 1" if alpha != 1.0 else "the code was projected into the latent ball"
            return None, f"{why}, so the edited code is not an exact copy of the object's cells"
        if before.shape[:2] != image.shape[:2]:
            return None, f"the image changed size ({before.shape[1]}x{before.shape[0]} -> {image.shape[1]}x{image.shape[0]})"
        from factory.latent.clone import carry_points

        layout = self.generator.grid_layout
        carried = carry_points(move, points, (before.shape[0] / layout.height, before.shape[1] / layout.width),
                               {k: s.meta.get(k) for k in PER_OBJECT})
        return (None, carried) if isinstance(carried, str) else (carried, None)

    def _label(self, s: Sample, before: np.ndarray, image: np.ndarray, z_new, source_norm: float, art,
               alpha: float, projected: bool, source_count, target_count, move=None) -> None:
        p = self.params
        s.meta["_before"] = base64.b64encode(encode_image(np.ascontiguousarray(before), "png")).decode()
        s.meta["latent"] = {**s.meta["latent"], "z": [float(v) for v in z_new.detach().cpu()],
                            "generator": self.generator.model_id, "source_norm": round(source_norm, 4)}
        inversion = s.meta.get("inversion") or {}
        artefact = art.id[:16] if art is not None else None  # the slot editor fits nothing
        hyper = dict(art.spec.get("hyper", {})) if art is not None else dict(p.hyper)
        edit = {"kind": "count" if p.attribute == COUNT else "attribute", "editor": p.editor,
                "attribute": p.attribute, "alpha": alpha, "artefact": artefact, "projected": projected,
                "inverter": inversion.get("method"), "reconstruction_error": inversion.get("mse")}
        # The old labels described the image before the edit; after it only what the edit
        # promises is a label (and check_edit verifies it). Points, boxes and the density
        # map no longer hold, so they go, unless a count edit says which object it copied or
        # erased (the clone editor): then they are carried over with it. The count is the
        # intended target for count edits and unknown after an attribute edit (adding
        # many_objects adds objects).
        if p.editor == SLOT and move is not None:
            edit["slot"] = move.as_dict()  # which slot, its drawn box, whose appearance it copied
        carried, dropped = (self._carried(s, before, image, move, alpha, projected)
                            if p.attribute == COUNT else (None, None))
        had_density = s.density is not None
        for k in ("points", *PER_OBJECT):
            s.meta.pop(k, None)
        s.density = None
        if carried is not None:
            points, lists = carried
            s.meta.update(points=points, **lists)
            if had_density:
                from factory.world.scenes import DENSITY_SIGMA, density_map

                s.density = density_map(points, image.shape[:2])
                edit["density"] = f"made from the carried points (Gaussian, sigma {DENSITY_SIGMA} px)"
            edit["labels_carried"] = True
        elif dropped is not None:
            edit.update(labels_carried=False, labels_dropped=dropped)
        if p.attribute == COUNT:
            edit.update(source_count=int(source_count), target_count=int(target_count), change=p.change)
            s.meta["count"] = int(target_count)
            if isinstance(s.meta.get("attributes"), dict):
                # Colours are kept (the new object is a copy of one in the scene), but how many
                # objects there are and their mean size are not what the source's labels said.
                s.meta["attributes"] = {k: v for k, v in s.meta["attributes"].items() if k not in OBJECT_ATTRIBUTES}
        else:
            edit["direction"] = p.direction
            s.meta.pop("count", None)
            old = s.meta.get("attributes")
            if old:
                edit["source_attributes"] = old
            # Only the edited attribute is a label by construction; the others were meant to
            # stay, which check_edit measures rather than this stage asserting.
            s.meta["attributes"] = {p.attribute: p.direction > 0}
            if s.meta.get("caption"):
                # Captions name colours, which attribute edits change: keep the old one for
                # reference and leave the caption to a later `caption` stage.
                edit["source_caption"] = s.meta.pop("caption")
        s.meta["edit"] = edit
        s.image = image
        # The slot editor knows each object's pixels (its drawn alpha), so an edit whose labels were
        # carried gets a mask matched to them. No other editor does (a clone's copy is a code's
        # cells, not pixels): the mask goes, even where points are carried.
        mask_dropped = drop_mask(s)
        if p.editor == SLOT and carried is not None:
            from factory.latent.editors.slot import instance_mask

            s.mask = instance_mask(self.generator.model, z_new.detach().cpu().numpy(), s.meta["points"])
            edit["mask"] = ("each object's drawn alpha above 0.5, numbered by its labelled point" if s.mask is not None
                            else "none: the slots and the carried points do not pair one to one")
            mask_dropped = []
        s.add_op("edit", editor=p.editor, attribute=p.attribute,
                 **({"change": p.change} if p.attribute == COUNT else {"direction": p.direction}),
                 alpha=alpha, generator=self.generator.model_id,
                 labeller=p.labeller if p.editor != SLOT else None, artefact=artefact,
                 n_fit=p.n_fit if art is not None else None, n0=p.n0 if p.editor == "balanced_centroid" else None,
                 confidence=p.confidence if art is not None else None,
                 oversample=p.oversample, fit_seed=p.fit_seed, hyper=hyper,
                 **({"labels_dropped": mask_dropped} if mask_dropped else {}))
