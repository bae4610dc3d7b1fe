"""Latent editors, one module per family behind the one ``EDITORS`` table.

A recipe's ``editor:`` name finds its family here in one hop:

    balanced_centroid, centroid   centroid.py     z + alpha*u, u a (balanced) centroid difference
    wasserstein                   wasserstein.py  z + alpha*H(z), H an affine map under a Sinkhorn divergence
    classifier                    classifier.py   gradient steps on a latent classifier (Latent Transformer-style)
    clone                         clone.py        count edits: an object's cells copied or erased (factory.latent.clone)
    continuous                    continuous.py   calibrated shift / zoom / brightness knobs (Plumerault et al. 2020)
    slot                          slot.py         count edits on an object-slot generator: one slot switched on or off

What they share: codes.py (labelled codes, source/target splits, the labelled-codes cache),
artefacts.py (specs, cache keys, :class:`EditArtefact`, :func:`fit_or_load`), common.py
(fingerprints, the latent ball, :class:`EditorFamily`). Every name of the former single module
is re-exported here, so ``from factory.latent.editors import X`` keeps working.
"""
from __future__ import annotations

# Re-exports: every name of the former single module (noqa: they are this package's interface).
from factory.latent.editors.artefacts import (  # noqa: F401
    EditArtefact, EditResult, _artefact_stem, artefact_key, check_editor_attribute, fit_artefact, fit_or_load,
    load_artefact, make_spec, save_artefact)
from factory.latent.editors.centroid import (  # noqa: F401
    BALANCED_CENTROID, CENTROID, Direction, _allocate, _unit, balanced_centroid_direction, balanced_sample,
    centroid_direction)
from factory.latent.editors.classifier import (  # noqa: F401
    CLASSIFIER, ClassifierGuidedEditor, LatentClassifier, _binary_kl, classifier_edit, count_columns,
    fit_latent_classifier)
from factory.latent.editors.clone import CLONE, count_check, fit_clone, pixel_gap_check  # noqa: F401
from factory.latent.editors.codes import (  # noqa: F401
    LabelledCodes, Split, _cells, _label_codes, count_transitions, fit_seeds, label_encoded, label_latents,
    labelled_codes, split_codes)
from factory.latent.editors.continuous import CONTINUOUS, FACTORS, continuous_spec  # noqa: F401
from factory.latent.editors.common import (  # noqa: F401
    _NOT_WEIGHTS, ARTEFACT_VERSION, COUNT_DERIVED, DEFAULT_CACHE, EditorFamily, _atomic, _jsonable,
    model_fingerprint, project_to_ball)
from factory.latent.editors.slot import SLOT, SLOT_FAMILY  # noqa: F401
from factory.latent.editors.wasserstein import (  # noqa: F401
    WASSERSTEIN, WassersteinEditor, _confidence_weights, _match_cells, _normalised, fit_wasserstein_map, sinkhorn,
    wasserstein_map)

# The recipe name of each editor -> its family (module, hyper-parameter defaults, fit, step).
EDITORS: dict[str, EditorFamily] = {f.name: f for f in (BALANCED_CENTROID, CENTROID, WASSERSTEIN, CLASSIFIER, CLONE,
                                                               CONTINUOUS, SLOT_FAMILY)}
# Hyper-parameters of each editor, with their defaults; a spec carries them all
# so the cache key changes whenever one does.
HYPER_DEFAULTS = {name: f.hyper for name, f in EDITORS.items()}
