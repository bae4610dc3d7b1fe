"""The stage contract and the registry of stages by name.

A stage is a callable class in the style of Ray's batch-inference examples:
``__init__`` loads its model once per actor, ``__call__`` maps a batch of rows
to a batch of rows. Stages live in ``actors/`` or in any other package; every
package, this one included, declares its stages as entry points in the
``factory.stages`` group (``name = "module:Class"``), and :func:`get_stage`
imports a stage's module the first time a recipe names it. So the core never
imports ``actors``, and a third-party stage is found the same way as a built-in.
"""
from __future__ import annotations

import difflib
import time
import traceback
from importlib.metadata import entry_points
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import FactoryError
from .sample import Sample, from_batch, stage_seed, to_batch


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(BaseModel):
    """What one actor of a stage asks of the cluster. Fractions share a device."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    # Bytes of RAM one actor needs (Ray's `memory` resource), from a measured peak RSS
    # (benchmarks/stage_memory.py); Ray then places no more actors on a node than fit. 0: not declared.
    memory: int = 0


SECONDS = "_seconds"  # private meta key: never written to the labels (see label_json)


def record_seconds(samples: list[Sample], stage: str, seconds: float) -> None:
    """Share a batch's wall time out over its samples, under a private meta key.

    Time is not a label: written into the JSON it would make two runs' shards differ.
    The shard writer sums it per stage into the shard's stats instead."""
    each = seconds / len(samples)
    for s in samples:
        spent = s.meta.setdefault(SECONDS, {})
        spent[stage] = round(spent.get(stage, 0.0) + each, 4)


class Stage:
    """Base class: per-sample work with failures recorded, not raised.

    Subclasses set ``name``, ``Params`` (a pydantic model of the recipe's
    ``params``) and override :meth:`process_one`, or :meth:`process` when the
    model wants whole batches (diffusion, captioning).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 32
    # Labels a stage needs on its input and labels it writes: checked against
    # the sources before a run starts, so a missing caption stops the run
    # before a model is loaded, not on a GPU worker.
    needs: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def needs_with(cls, params: dict) -> dict[str, str]:
        """What the stage needs with these params, each with why (the preflight error says it).
        Most stages always need the same: ``needs``; one whose options ask for more overrides this."""
        return {label: "" for label in cls.needs}

    def __init__(self, params: dict | None = None, device: str | None = None, context: dict | None = None):
        self.params = self.Params(**(params or {}))
        self.device = device or _default_device()
        # What a stage may need to know of the run beyond its own params:
        # {"sources": [resolved source specs], "seed": recipe seed}.
        self.context = context or {}

    # Ray Data calls this with a dict of numpy columns.
    def __call__(self, batch: dict) -> dict:
        return to_batch(self.run(from_batch(batch)))

    def run(self, samples: list[Sample]) -> list[Sample]:
        """Process the samples still alive, timing the work for the shard's stats."""
        alive = [s for s in samples if s.alive]
        if alive:
            t0 = time.perf_counter()
            self.process(alive)
            record_seconds(alive, self.name, time.perf_counter() - t0)
        return samples

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            self.guarded(s, self.process_one)

    def process_one(self, sample: Sample, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def usable(self, samples: list[Sample]) -> list[Sample]:
        """The samples this stage can work on; the others fail here with the reason
        :meth:`unusable` gives (checked before a batched model call, so one bad
        sample does not take its batch down)."""
        ready = []
        for s in samples:
            reason = self.unusable(s)
            if reason:
                s.fail(self.name, reason)
            else:
                ready.append(s)
        return ready

    def unusable(self, sample: Sample) -> str | None:
        return None

    def guarded(self, sample: Sample, fn) -> None:
        """Run ``fn(sample, rng)``; an exception fails this sample only, with its reason."""
        try:
            fn(sample, self.rng(sample))
        except Exception as e:  # noqa: BLE001 - a sample's failure is data, not a crash
            last = traceback.extract_tb(e.__traceback__)[-1]
            sample.fail(self.name, f"{type(e).__name__}: {e} ({last.filename.split('/')[-1]}:{last.lineno})")

    def rng(self, sample: Sample) -> np.random.Generator:
        return np.random.default_rng(stage_seed(sample.seed, self.name))


def torch_dtype(name: str, device: str):
    """A recipe's dtype name as a torch dtype; "auto" is fp16 on a GPU, fp32 on the CPU."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return table.get(name, torch.float16 if device == "cuda" else torch.float32)


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


_REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Register a stage class by its name (for stages made in code; packages declare theirs as
    entry points in the ``factory.stages`` group, which :func:`get_stage` finds by name)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a stage name")
    _REGISTRY[cls.name] = cls
    return cls


GROUP = "factory.stages"


def _declared() -> dict:
    """Stage name -> entry point, over every installed package's ``factory.stages`` group, this
    project's built-in stages included (pyproject.toml declares them like any plugin). When the
    code runs from a source tree (a Ray job's uploaded working_dir, a checkout on PYTHONPATH), that
    tree's own pyproject.toml is read too, so the stages of the code that runs are the ones found,
    even where an older version of the package is installed."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    found.update(_source_tree_entries())
    return found


def _source_tree_entries() -> dict:
    from importlib.metadata import EntryPoint
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    try:
        import tomllib  # Python 3.11+; on 3.10 the installed entry points alone are used
    except ImportError:
        return {}
    try:
        table = tomllib.loads(pyproject.read_text())["project"]["entry-points"][GROUP]
    except (KeyError, tomllib.TOMLDecodeError):
        return {}
    return {name: EntryPoint(name, value, GROUP) for name, value in table.items()}


def _load_entry(ep) -> None:
    """Import what an entry point names: a Stage class is registered under the entry's name; a
    module is imported for the stages it registers itself."""
    obj = ep.load()
    if isinstance(obj, type) and issubclass(obj, Stage):
        if obj.name != ep.name:
            raise FactoryError(f"entry point {ep.name!r} = {ep.value} names a stage called {obj.name!r}: "
                               f"the entry's name must be the stage's name")
        register(obj)


def stage_names() -> list[str]:
    """Every stage a recipe may name, without importing any of them."""
    return sorted(set(_declared()) | set(_REGISTRY))


def get_stage(name: str) -> type[Stage]:
    """The stage class a recipe names, imported on first use: the core never imports a stage module
    itself (``factory`` depends on no module of ``actors``), it finds stages the way it finds plugins."""
    if name not in _REGISTRY:
        declared = _declared()
        if name in declared:
            _load_entry(declared[name])
        elif not declared:
            raise FactoryError(
                "no stages are installed: the factory finds its stages through the `factory.stages` entry "
                "points of installed packages; install the project (`pip install -e .` in its folder, or "
                "`make install`) so they are declared")
    if name not in _REGISTRY:
        names = stage_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FactoryError(f"unknown stage {name!r}.{hint} Known stages: {', '.join(names)}.")
    return _REGISTRY[name]
