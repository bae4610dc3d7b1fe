"""Shards written where they are made.

Two pieces run on the workers, one bookkeeper on the driver:

* :class:`ShardStager`, the pipeline's last ``map_batches``: encodes each
  finished sample to its tar members and stages them under the output by shard
  (:mod:`factory.staging`); it returns one small completion record per sample
  (shard, position, status, and a write fault if staging failed): what the driver receives
  instead of the samples.
* :func:`write_staged_shard`, run by a writer actor for each complete shard:
  reads the staged rows back in plan order and writes the shard with the same
  :func:`factory.shards.write_shard` as ever (temporary name, stats, rename),
  so the bytes are those of a driver-written shard.
* :class:`ShardTracker` and :class:`ShardWriters` on the driver: count records
  per open shard and hand a shard to a writer when it is whole.

Why not Ray Data's ``groupby(shard)``: it is an all-to-all exchange that waits
for the whole dataset before the first group comes out, so the first shard
would be written after the last sample, and the stream's memory bound would be
lost. Staging keeps the stream streaming, and a staged piece survives the actor
or node that wrote it: a retried batch rewrites the same piece, and a shard's
writer needs no state from anyone.
"""
from __future__ import annotations

import json
import time

import numpy as np

from .output_errors import OutputWriteError, writing
from .sample import encode_members, from_batch
from .shards import OutputDir, shard_name, write_shard
from .stage import SECONDS
from .staging import StagedShard, write_piece


class ShardStager:
    """Encode finished samples on the workers and stage them under the output, by shard."""

    def __init__(self, out: str, image_format: str):
        self.out = OutputDir(out)
        self.image_format = image_format

    def __call__(self, batch: dict) -> dict:
        by_shard: dict[int, list] = {}
        records = {"shard": [], "pos": [], "status": []}
        for s in from_batch(batch):
            status = {k: s.meta[k] for k in ("failed", "filtered") if s.meta.get(k)}
            members = None
            if not status:
                try:
                    members = encode_members(s, self.image_format)
                except Exception as e:  # noqa: BLE001 - recorded per sample
                    status = {"failed": {"stage": "encode", "reason": f"{type(e).__name__}: {e}"}}
            # The stages' time rides with the staged row to the shard's stats, not to the driver.
            spent = {"seconds": s.meta[SECONDS]} if s.meta.get(SECONDS) else {}
            by_shard.setdefault(s.shard, []).append((s.pos, s.key, members, {**status, **spent}))
            records["shard"].append(s.shard)
            records["pos"].append(s.pos)
            records["status"].append(json.dumps(status) if status else "")
        fault = ""
        try:
            for shard, rows in by_shard.items():
                with writing(self.out.url, f"staged samples of {shard_name(shard)}"):
                    write_piece(self.out, shard, sorted(rows, key=lambda r: r[0]))
        except OutputWriteError as e:
            # Told to the driver as data, not raised: Ray Data would wrap the exception in one that
            # loses its cause and log a stack trace; the driver stops the run with one paragraph.
            fault = json.dumps({"url": e.url, "what": e.what, "cause": e.cause})
        n = len(records["shard"])
        return {"shard": np.asarray(records["shard"], np.int64), "pos": np.asarray(records["pos"], np.int64),
                "status": np.asarray(records["status"], dtype=object),
                "fault": np.asarray([fault] * n, dtype=object)}


class StagedRowsMissing(Exception):
    """A shard's writer found fewer staged rows than the driver counted (a piece was removed)."""


def write_staged_shard(out_url: str, shard: int, expected: int, started: float) -> dict:
    """Write one shard from its staged rows; returns its counts (the driver's completion record)."""
    out = OutputDir(out_url)
    with writing(out.url, f"{shard_name(shard)} (reading its staged samples)"):
        staged = StagedShard(out, shard)
    missing = staged.missing(expected)
    if missing:
        raise StagedRowsMissing(f"{shard_name(shard)}: {len(missing)} staged rows are missing "
                                f"(e.g. position {missing[0]}); rerun to remake the shard")
    with writing(out.url, shard_name(shard)):
        stats = write_shard(out, shard, staged.rows(expected), started)
    try:
        staged.remove()
    except Exception:  # noqa: BLE001 - the shard is complete; the next run clears what is left
        pass
    return {"shard": shard, "planned": stats["planned"], "generated": stats["generated"]}


class ShardTracker:
    """Which rows of each open shard have been staged. Memory: one bit per row of the shards
    in flight, plus the numbers of the shards finished (a set of ints, 1/shard_size of the plan)."""

    def __init__(self, shard_len):
        self.shard_len = shard_len
        self.open: dict[int, tuple[np.ndarray, float]] = {}
        self.finished: set[int] = set()

    def add(self, shards: np.ndarray, positions: np.ndarray) -> list[tuple[int, float]]:
        """Record staged rows; returns the shards they completed, each with when it started."""
        done = []
        for shard in np.unique(shards):
            shard = int(shard)
            if shard in self.finished:
                continue  # a retried batch's records, seen before
            if shard not in self.open:
                self.open[shard] = (np.zeros(self.shard_len(shard), bool), time.time())
            mask, started = self.open[shard]
            mask[positions[shards == shard]] = True
            if mask.all():
                del self.open[shard]
                self.finished.add(shard)
                done.append((shard, started))
        return done


class ShardWriterActor:
    """Writes shards from their staged rows. Actors rather than tasks: a worker imports
    webdataset (and torch, which it imports) once, not once per shard on a fresh worker
    (seconds on a busy node)."""

    def __init__(self):
        import webdataset  # noqa: F401 - its TarWriter (and torch, which it imports) loaded before the first shard

    def write(self, out_url: str, shard: int, expected: int, started: float) -> dict:
        return write_staged_shard(out_url, shard, expected, started)


class ShardWriters:
    """The driver's handle on the shard writers: a few actors spread over the nodes, each
    writing up to two shards at once; a shard goes to one by its number. At most ``2 *
    actors`` writes are in flight (each holds a shard's file handles), which also keeps the
    driver's list of them short."""

    def __init__(self, out_url: str, actors: int = 2):
        self.out_url, self.count = out_url, actors
        self.actors: list = []  # started with the first complete shard, off the stages' start-up
        self.limit = 2 * actors
        self.pending: list = []

    def _start(self) -> None:
        import ray

        # num_cpus=0: writing is I/O, and the stages' actor pools hold the CPUs. A writer on a
        # node that dies is restarted elsewhere and its write retried: writes are idempotent
        # (temporary name, rename), and application errors (write faults) are not retried.
        cls = ray.remote(ShardWriterActor).options(num_cpus=0, max_concurrency=2, max_restarts=-1,
                                                   max_task_retries=-1, scheduling_strategy="SPREAD")
        self.actors = [cls.remote() for _ in range(self.count)]

    def submit(self, shard: int, expected: int, started: float) -> list[dict]:
        """Launch a shard's writer; returns the records of writers that finished meanwhile."""
        finished = []
        while len(self.pending) >= self.limit:
            finished += self._collect(timeout=None)
        if not self.actors:
            self._start()
        actor = self.actors[shard % len(self.actors)]
        self.pending.append(actor.write.remote(self.out_url, shard, expected, started))
        return finished + self.poll()

    def poll(self) -> list[dict]:
        return self._collect(timeout=0)

    def drain(self) -> list[dict]:
        finished = []
        while self.pending:
            finished += self._collect(timeout=None)
        return finished

    def settle(self, timeout: float) -> None:
        """After a failure: let writes in flight finish (a shard they complete is complete), up to
        ``timeout`` s, ignoring their errors."""
        import ray

        if self.pending:
            ray.wait(self.pending, num_returns=len(self.pending), timeout=timeout)
        self.pending = []

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def _collect(self, timeout: float | None) -> list[dict]:
        import ray

        if not self.pending:
            return []
        ready, self.pending = ray.wait(self.pending, num_returns=1 if timeout is None else len(self.pending),
                                       timeout=timeout)
        return [ray.get(ref) for ref in ready]
