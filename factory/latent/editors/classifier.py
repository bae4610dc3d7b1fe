"""The classifier-guided editor (the Latent-Transformer-style baseline): a latent classifier
fitted on the labelled codes, and z' found by gradient descent on BCE(classifier(z'), target) +
lambda*||z' - z||^2 (:func:`classifier_edit`, :class:`ClassifierGuidedEditor`). The Wasserstein
editor borrows its latent classifier for the attribute-preservation term."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from factory.errors import FactoryError
from factory.latent.editors.codes import LabelledCodes
from factory.latent.editors.common import EditorFamily, project_to_ball


class LatentClassifier(nn.Module):
    """Logistic regression (hidden=0) or a one-hidden-layer MLP on codes.

    Inputs are standardised with the fitting codes' mean and spread (stored as
    buffers), so the same learning rate suits generators of any code scale.
    """

    def __init__(self, dim: int, outputs: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        self.net = nn.Linear(dim, outputs) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, outputs))
        self.hidden = hidden

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net((z - self.mean) / self.scale)


def fit_latent_classifier(z: np.ndarray, targets: np.ndarray, multiclass: bool = False, hidden: int = 0,
                          steps: int = 300, seed: int = 0) -> LatentClassifier:
    """Fit on soft labels: per-output BCE (binary attributes) or cross-entropy (counts, ``targets`` (n, C))."""
    g = torch.Generator().manual_seed(seed)
    zt, yt = torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.float32)
    clf = LatentClassifier(zt.shape[1], yt.shape[1], hidden)
    clf.mean.copy_(zt.mean(0))
    clf.scale.copy_(zt.std(0).pow(2).mean().sqrt().clamp_min(1e-6))
    with torch.no_grad():  # a seeded init, independent of the global torch RNG
        for p in clf.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.01 if p.ndim > 1 else 0.0))
    opt = torch.optim.Adam(clf.net.parameters(), lr=0.05 if hidden == 0 else 0.01, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        logits = clf(zt)
        loss = (nn.functional.cross_entropy(logits, yt) if multiclass
                else nn.functional.binary_cross_entropy_with_logits(logits, yt))
        loss.backward()
        opt.step()
    return clf.eval()


def _binary_kl(p_new: torch.Tensor, p_old: torch.Tensor) -> torch.Tensor:
    """KL(p_old || p_new) per element for Bernoulli probabilities: zero when nothing changed."""
    eps = 1e-6
    p_new, p_old = p_new.clamp(eps, 1 - eps), p_old.clamp(eps, 1 - eps)
    return p_old * (p_old / p_new).log() + (1 - p_old) * ((1 - p_old) / (1 - p_new)).log()


def classifier_edit(classifier: LatentClassifier, z: torch.Tensor, target: torch.Tensor, column: int | None = None,
                    lam: float = 0.5, steps: int = 100, lr: float = 0.05) -> torch.Tensor:
    """z' minimising BCE(classifier(z')[column], target) + lam * mean((z'-z)/spread)^2, from z.

    ``column`` None: the classifier is a count head and ``target`` the class indices
    (cross-entropy). Spread is the classifier's code scale, so lam is scale-free.
    """
    classifier = classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    scale = float(classifier.scale)
    z = z.detach().float()
    delta = torch.zeros_like(z, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr * scale)
    for _ in range(steps):
        opt.zero_grad()
        logits = classifier(z + delta)
        if column is None:
            fit = nn.functional.cross_entropy(logits, target.long(), reduction="none")
        else:
            fit = nn.functional.binary_cross_entropy_with_logits(logits[:, column], target.float(), reduction="none")
        loss = (fit + lam * (delta / scale).pow(2).mean(1)).sum()
        loss.backward()
        opt.step()
    return (z + delta).detach()


class ClassifierGuidedEditor:
    """The Latent-Transformer-style baseline as an object: a latent classifier fitted on labelled
    codes (an attribute head, or a count head over the labeller's counts), and edits by
    gradient steps on BCE(classifier(z'), target) + lam*||z' - z||^2."""

    def __init__(self, hidden: int = 0, lam: float = 0.5, steps: int = 100, lr: float = 0.05, seed: int = 0):
        self.hidden, self.lam, self.steps, self.lr, self.seed = hidden, lam, steps, lr, seed
        self.classifier: LatentClassifier | None = None
        self.column: int | None = None
        self.counts: tuple[int, ...] = ()

    def fit(self, codes: LabelledCodes, attribute: int | str) -> "ClassifierGuidedEditor":
        if attribute == "count":
            self.classifier = fit_latent_classifier(codes.z, codes.count_probs, True, self.hidden, seed=self.seed)
            self.column, self.counts = None, tuple(codes.counts)
        else:
            self.classifier = fit_latent_classifier(codes.z, codes.probs, False, self.hidden, seed=self.seed)
            self.column = codes.attribute_index(attribute)
        return self

    def edit(self, z: torch.Tensor, target, radius: float | None = None):
        """(z', projected). ``target``: 0/1 (or a tensor of them) for an attribute, the target
        count(s) for a count head."""
        if self.classifier is None:
            raise FactoryError("ClassifierGuidedEditor.edit before fit: fit it on labelled codes first")
        t = torch.as_tensor(target, device=z.device).expand(len(z))
        if self.column is None:
            unknown = sorted({int(c) for c in t} - set(self.counts))
            if unknown:
                raise FactoryError(f"target count {unknown[0]} is outside the counts "
                                   f"{self.counts[0]}-{self.counts[-1]} the labeller knows")
            t = torch.tensor([self.counts.index(int(c)) for c in t], device=z.device)
        z_new = classifier_edit(self.classifier.to(z.device), z, t, self.column, self.lam, self.steps, self.lr)
        return project_to_ball(z_new, radius)


def count_columns(targets, counts) -> np.ndarray:
    """The column of each target count in a count head over ``counts``, or a FactoryError
    naming the first target it does not know."""
    counts = [int(c) for c in counts]
    bad = [int(t) for t in targets if int(t) not in counts]
    if bad:
        raise FactoryError(f"target count {bad[0]} is outside the counts {counts[0]}-{counts[-1]} the labeller knows")
    return np.array([counts.index(int(t)) for t in targets], dtype=np.int64)


HYPER = {
    "hidden": 0,           # 0: logistic regression on codes; >0: a one-hidden-layer MLP
    "lam": 0.5,            # proximity weight, per dimension in spread units
    "steps": 100,
    "lr": 0.05,
}


def _fit(spec: dict, codes: LabelledCodes) -> tuple[dict, dict]:
    h, attribute = spec["hyper"], spec["attribute"]
    c = ClassifierGuidedEditor(int(h["hidden"]), h["lam"], int(h["steps"]), h["lr"], spec["fit_seed"])
    c.fit(codes, attribute)
    with torch.no_grad():
        logits = c.classifier(torch.from_numpy(codes.z))
    if attribute == "count":
        stats = {"outputs": len(codes.counts), "counts": list(codes.counts), "column": None}
        acc = (logits.argmax(1).numpy() == codes.count_probs.argmax(1)).mean()
    else:
        stats = {"outputs": codes.probs.shape[1], "column": c.column}
        acc = ((logits[:, c.column] > 0).numpy() == codes.labels[:, c.column]).mean()
    stats.update(method="classifier", hidden=c.hidden, n_codes=len(codes), train_accuracy=float(acc))
    tensors = {f"clf.{k}": v.detach().clone() for k, v in c.classifier.state_dict().items()}
    return tensors, stats


def load_classifier(art) -> LatentClassifier:
    """A classifier artefact's latent classifier, from its ``clf.*`` tensors."""
    state = {k[4:]: v for k, v in art.tensors.items() if k.startswith("clf.")}
    clf = LatentClassifier(int(state["mean"].shape[0]), int(art.stats["outputs"]), int(art.stats["hidden"]))
    clf.load_state_dict(state)
    return clf.eval()


def _step(art, z: torch.Tensor, target=None, check=None, place_check=None):
    """(z* - z) / alpha_fit, z* the guided code: alpha = the spec's alpha gives z*."""
    clf = art.classifier().to(z.device)
    h = {**HYPER, **art.spec.get("hyper", {})}
    if art.spec["attribute"] == "count":
        if target is None:
            raise FactoryError("a classifier count edit needs the target count of every code")
        idx = torch.as_tensor(count_columns(target, art.stats["counts"]), device=z.device)
        z_star = classifier_edit(clf, z, idx, None, h["lam"], h["steps"], h["lr"])
    else:
        want = torch.full((len(z),), 1.0 if art.spec["direction"] > 0 else 0.0, device=z.device)
        z_star = classifier_edit(clf, z, want, int(art.stats["column"]), h["lam"], h["steps"], h["lr"])
    return (z_star - z) / float(art.spec["alpha"]), None, None


CLASSIFIER = EditorFamily("classifier", __name__, HYPER, _fit, _step)
