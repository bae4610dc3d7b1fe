"""The plan as a Ray Data source: rows are made on the workers, a shard at a time.

Each read task gets the (small) plan and a run of shard numbers and makes
those shards' rows from the recipe when it runs, so the driver never
materialises rows: it ships the plan, not the table. Ray Data streams the
tasks with backpressure, in order, so shards open and complete roughly in
plan order and only a window of them is in flight at once.
"""
from __future__ import annotations

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .plan import Plan
from .sample import to_batch

MAX_READ_TASKS = 1000  # above this, consecutive shards share a task (task objects live in the driver)
ROW_BYTES = 300  # a plan row in memory (key, seed, position, JSON of where to read it)


class PlanDatasource(Datasource):
    def __init__(self, plan: Plan, shards: list[int]):
        super().__init__()
        self.plan, self.shards = plan, shards

    def get_name(self) -> str:
        return "Plan"

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.plan.shard_len(s) for s in self.shards) * ROW_BYTES

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        per_task = -(-len(self.shards) // MAX_READ_TASKS)
        tasks = []
        for i in range(0, len(self.shards), per_task):
            group = self.shards[i: i + per_task]
            rows = sum(self.plan.shard_len(s) for s in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * ROW_BYTES, input_files=None, exec_stats=None)
            tasks.append(ReadTask(_reader(self.plan, group), meta))
        return tasks


def _reader(plan: Plan, shards: list[int]):
    def read():
        for shard in shards:
            yield plan_block(plan, shard)

    return read


def plan_block(plan: Plan, shard: int) -> pa.Table:
    """One shard's plan rows as an Arrow block, in the columns the stages read (factory.sample)."""
    batch = to_batch([it.to_sample() for it in plan.shard_rows(shard)])
    return pa.table({
        "key": pa.array(list(batch["key"]), pa.string()),
        "seed": pa.array(batch["seed"], pa.int64()),
        "shard": pa.array(batch["shard"], pa.int64()),
        "pos": pa.array(batch["pos"], pa.int64()),
        "image": pa.array(list(batch["image"]), pa.binary()),
        "density": pa.array(list(batch["density"]), pa.binary()),
        "mask": pa.array(list(batch["mask"]), pa.binary()),
        "meta": pa.array(list(batch["meta"]), pa.string()),
    })
