"""The plan: a deterministic table with one row per output sample (DESIGN §2).

Row order is source order, then variant; shard ``i`` holds rows
``[i*S, (i+1)*S)``. Keys are ``<source id>-<op>-<variant>`` and seeds are a
hash of the recipe seed and the key, so neither depends on batching, worker
count or where a run was resumed.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from .errors import FactoryError
from .recipe import Recipe
from .sample import Sample, sample_seed
from .sources import SourceRef, list_source

MAX_KEY = 100


@dataclass
class WorkItem:
    key: str
    seed: int
    shard: int
    pos: int
    source: SourceRef
    variant: int

    def to_sample(self) -> Sample:
        """The sample that enters the pipeline: only a key, a seed and where to read it."""
        return Sample(
            key=self.key, seed=self.seed, shard=self.shard, pos=self.pos,
            meta={"_source": self.source.where, "variant": self.variant},
        )


@dataclass
class Plan:
    recipe: Recipe
    items: list[WorkItem]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return (len(self.items) + self.recipe.output.shard_size - 1) // self.recipe.output.shard_size

    def shard_sizes(self) -> dict[int, int]:
        return dict(Counter(it.shard for it in self.items))

    def items_of(self, shards: set[int]) -> list[WorkItem]:
        return [it for it in self.items if it.shard in shards]


def make_key(source_id: str, op: str, variant: int) -> str:
    key = f"{source_id}-{op}-{variant:02d}"
    if len(key) > MAX_KEY:
        # Long source ids keep a readable head and a hash so keys stay unique.
        digest = hashlib.sha256(source_id.encode()).hexdigest()[:12]
        key = f"{source_id[: MAX_KEY - len(op) - 20]}_{digest}-{op}-{variant:02d}"
    return key


def make_plan(recipe: Recipe) -> Plan:
    refs: list[SourceRef] = []
    warnings: list[str] = []
    for spec in recipe.sources:
        r, w = list_source(spec)
        refs += r
        warnings += w
    dupes = [i for i, n in Counter(r.id for r in refs).items() if n > 1]
    if dupes:
        raise FactoryError(
            f"{len(dupes)} source ids occur in more than one source (e.g. {dupes[0]!r}); "
            f"keys must be unique: use distinct world ranges (start/n) or distinct shard sets"
        )
    size = recipe.output.shard_size
    items = []
    for ref in refs:
        for v in range(recipe.variants):
            n = len(items)
            key = make_key(ref.id, recipe.op, v)
            items.append(WorkItem(key, sample_seed(recipe.seed, key), n // size, n % size, ref, v))
    return Plan(recipe, items, warnings)
