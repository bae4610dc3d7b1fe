"""The plan: a deterministic table with one row per output sample (DESIGN §2).

Row order is source order, then variant; shard ``i`` holds rows
``[i*S, (i+1)*S)``. Keys are ``<source id>-<op>-<variant>`` and seeds are a
hash of the recipe seed and the key, so neither depends on batching, worker
count or where a run was resumed.

The plan is streamed: it holds each source's size (see :mod:`factory.listing`)
and makes the rows of a shard when that shard is read, so planning ten million
samples costs what planning ten does, and a run's driver never holds rows.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
from dataclasses import dataclass, field

from .errors import FactoryError
from .listing import SourceTable, check_unique_ids, source_table
from .recipe import Recipe
from .sample import Sample, sample_seed
from .sources import SourceRef

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
    tables: list[SourceTable]
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._starts = list(itertools.accumulate((len(t) for t in self.tables), initial=0))

    @property
    def source_samples(self) -> int:
        return self._starts[-1]

    @property
    def total(self) -> int:
        """Planned output samples."""
        return self.source_samples * self.recipe.variants

    @property
    def shard_size(self) -> int:
        return self.recipe.output.shard_size

    @property
    def num_shards(self) -> int:
        return (self.total + self.shard_size - 1) // self.shard_size

    def shard_len(self, shard: int) -> int:
        return max(0, min(self.shard_size, self.total - shard * self.shard_size))

    def rows(self, start: int, stop: int) -> list[WorkItem]:
        """Plan rows ``[start, stop)``, made now from the recipe and the source tables."""
        v, size = self.recipe.variants, self.shard_size
        stop = min(stop, self.total)
        if start >= stop:
            return []
        refs = self._refs(start // v, (stop - 1) // v + 1)
        out = []
        for n in range(start, stop):
            ref, variant = refs[n // v - start // v], n % v
            key = make_key(ref.id, self.recipe.op, variant)
            out.append(WorkItem(key, sample_seed(self.recipe.seed, key), n // size, n % size, ref, variant))
        return out

    def shard_rows(self, shard: int) -> list[WorkItem]:
        return self.rows(shard * self.shard_size, (shard + 1) * self.shard_size)

    def iter_items(self):
        """Every row, a shard at a time (for small plans, tests and the bare-loop benchmark)."""
        for shard in range(self.num_shards):
            yield from self.shard_rows(shard)

    def _refs(self, start: int, stop: int) -> list[SourceRef]:
        """Source refs ``[start, stop)`` across the sources, in source order."""
        out = []
        t = bisect.bisect_right(self._starts, start) - 1
        while start < stop and t < len(self.tables):
            first = self._starts[t]
            out += self.tables[t].refs(start - first, stop - first)
            start = self._starts[t + 1]
            t += 1
        return out


def make_key(source_id: str, op: str, variant: int) -> str:
    key = f"{source_id}-{op}-{variant:02d}"
    if len(key) > MAX_KEY:
        # Long source ids keep a readable head and a hash so keys stay unique.
        digest = hashlib.sha256(source_id.encode()).hexdigest()[:12]
        key = f"{source_id[: MAX_KEY - len(op) - 20]}_{digest}-{op}-{variant:02d}"
    return key


def make_plan(recipe: Recipe) -> Plan:
    tables = [source_table(spec) for spec in recipe.sources]
    check_unique_ids(tables)
    return Plan(recipe, tables, [w for t in tables for w in t.warnings])


def parse_shard_range(text: str | None, num_shards: int) -> range:
    """``--shards A:B``: shards A to B-1 (Python slice style; A or B may be left out).

    Out of range, reversed or empty is an error that says what the plan has, before anything
    is written."""
    if text is None:
        return range(num_shards)
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else num_shards
    except ValueError:
        raise FactoryError(f"--shards {text!r} is not a range: write A:B for shards A to B-1, e.g. "
                           f"--shards 0:{max(1, num_shards // 2)} (the plan has {num_shards} shards, 0 to "
                           f"{num_shards - 1})") from None
    if start < 0 or stop < 0:
        raise FactoryError(f"--shards {text}: shard numbers start at 0 (the plan has shards 0 to {num_shards - 1})")
    if start >= stop:
        raise FactoryError(f"--shards {text} is {'empty' if start == stop else 'reversed'}: A must be below B "
                           f"(A:B runs shards A to B-1; the plan has shards 0 to {num_shards - 1})")
    if stop > num_shards:
        raise FactoryError(f"--shards {text} is out of range: the plan has {num_shards} shards (0 to "
                           f"{num_shards - 1}), so B is at most {num_shards}")
    return range(start, stop)
