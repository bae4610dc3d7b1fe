"""The runner: plan rows through Ray Data stages into the shard writer.

    plan rows ─► read ─► stage 1 ─► … ─► stage n ─► encode ─► driver: ShardAssembler

Each stage is a ``map_batches`` over an actor pool (one model load per actor)
sized from the recipe and the cluster's resources. Ray Data streams with
backpressure; rows may come back in any order, and the assembler puts them
back in plan order per shard, so the bytes do not depend on scheduling.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FactoryError
from .plan import Plan, make_plan
from .recipe import Recipe, StageSpec
from .sample import encode_members, from_batch, to_batch
from .shards import OutputDir, ShardAssembler
from .sources import SourceReader
from .stage import Resources, Stage, get_stage

READ_SPEC = StageSpec(name="read")


@dataclass
class RunResult:
    out: str
    planned: int
    shards_total: int
    shards_skipped: int
    shards_written: int
    generated: int = 0
    failed: dict = field(default_factory=dict)
    filtered: dict = field(default_factory=dict)
    seconds: float = 0.0
    startup_seconds: float = 0.0
    running_seconds: float = 0.0  # first batch out to last batch out
    running_samples: int = 0  # samples that came out after the first batch
    warnings: list = field(default_factory=list)


class SampleEncoder:
    """The last step: encode images, labels and density maps to tar members on the
    workers, so the driver only concatenates bytes."""

    def __init__(self, image_format: str):
        self.image_format = image_format

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "pos": [], "key": [], "members": [], "status": []}
        for s in from_batch(batch):
            status = {k: s.meta[k] for k in ("failed", "filtered") if s.meta.get(k)}
            members = b""
            if not status:
                try:
                    members = pickle.dumps(encode_members(s, self.image_format))
                except Exception as e:  # noqa: BLE001 - recorded per sample
                    status = {"failed": {"stage": "encode", "reason": f"{type(e).__name__}: {e}"}}
            out["shard"].append(s.shard)
            out["pos"].append(s.pos)
            out["key"].append(s.key)
            out["members"].append(members)
            out["status"].append(json.dumps(status))
        return {k: np.asarray(v, dtype=object if k in ("key", "members", "status") else np.int64)
                for k, v in out.items()}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Our progress bar and summary say what a user needs; Ray's INFO lines and
    # deprecation notices about its own internals would bury them.
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
    _quiet_ray_data_console()
    kwargs = dict(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                  logging_level=logging.WARNING)
    if address:
        # Workers elsewhere need our code: ship the two packages with the job.
        root = Path(__file__).resolve().parent.parent
        kwargs["runtime_env"] = {"py_modules": [str(root / "factory"), str(root / "actors")]}
        kwargs.pop("include_dashboard")
        ray.init(address=address, **kwargs)
    else:
        # "local": always a fresh instance, never a cluster someone left running here.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


class _DropProgressNotice(logging.Filter):
    def filter(self, record):
        return "Progress bars disabled" not in record.getMessage()


def _quiet_ray_data_console() -> None:
    import ray.data  # noqa: F401 - configures its loggers on import

    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
            h.addFilter(_DropProgressNotice())


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


ENCODER_CPUS = 0.25
READ_TASK_CPUS = 0.25  # Ray Data's input tasks need room beside the actor pools


def cpu_scale(requests: list[float], cluster_cpus: float) -> float:
    """Factor (<= 1) that makes one actor of every stage fit in the cluster's CPUs.

    Every pool starts at least one actor, all at once; asked for more CPUs than
    the cluster has, one never starts and the stream deadlocks (2-CPU machines
    with a 1-CPU generator did). Requests are scaled down together instead.
    """
    total = sum(requests) + ENCODER_CPUS + READ_TASK_CPUS
    return min(1.0, cluster_cpus / total) if cluster_cpus > 0 else 1.0


def _actor_options(spec: StageSpec, cls: type[Stage], gpus: float, workers: int | None, context: dict,
                   cpu_factor: float = 1.0) -> dict:
    from ray.data import ActorPoolStrategy

    res: Resources = spec.resources or cls.resources
    num_gpus = res.num_gpus if gpus > 0 else 0.0  # no GPU in the cluster: the same code on the CPU
    size = workers or spec.workers or 1
    if num_gpus > 0:
        size = max(1, min(size if (workers or spec.workers) else 10**6, math.floor(gpus / num_gpus)))
    return dict(
        compute=ActorPoolStrategy(min_size=1, max_size=size),
        num_cpus=round(res.num_cpus * cpu_factor, 4),
        num_gpus=num_gpus,
        batch_size=spec.batch_size or cls.batch_size,
        fn_constructor_kwargs={"params": prepared_params(spec, cls, context),
                               "device": "cuda" if num_gpus > 0 else "cpu", "context": context},
        # A killed actor is restarted and its batch retried (Ray's defaults, made explicit).
        max_restarts=-1,
        max_task_retries=-1,
    )


def prepared_params(spec: StageSpec, cls: type[Stage], context: dict) -> dict:
    """A stage's params after its driver-side ``prepare`` (once per run, before any actor starts).

    Editors fit their directions here: once per recipe, not once per actor or
    batch. ``prepare`` returns the params the actors get (e.g. with the fitted
    artefact's path); the recipe and its hash are unchanged, so resume holds.
    """
    prepare = getattr(cls, "prepare", None)
    return prepare(dict(spec.params), context) if prepare else spec.params


def build_dataset(recipe: Recipe, rows: dict, workers: int | None = None):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    n = len(rows["key"])
    blocks = max(1, min(n // 64, 200))
    ds = ray.data.from_items(
        [{k: rows[k][i] for k in rows} for i in range(n)], override_num_blocks=blocks
    )
    gpus = cluster_gpus()
    context = {"sources": [s.model_dump(mode="json") for s in recipe.sources], "seed": recipe.seed}
    specs = [(spec, SourceReader if spec is READ_SPEC else get_stage(spec.name)) for spec in [READ_SPEC, *recipe.stages]]
    factor = cpu_scale([(spec.resources or cls.resources).num_cpus for spec, cls in specs],
                       float(ray.cluster_resources().get("CPU", 0)))
    for spec, cls in specs:
        ds = ds.map_batches(cls, **_actor_options(spec, cls, gpus, workers, context, factor))
    return ds.map_batches(
        SampleEncoder, fn_constructor_kwargs={"image_format": recipe.output.image_format},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers or 1),
        num_cpus=round(ENCODER_CPUS * factor, 4), batch_size=64,
    )


def preflight(recipe: Recipe) -> None:
    """Refuse a run whose stages need captions the sources lack, before any model loads."""
    from .sources import shard_urls, source_captions

    provided: set[str] = set()
    latents = [src for src in recipe.sources if src.kind == "latents"]
    for spec in recipe.stages:
        cls = get_stage(spec.name)
        if latents and "image" not in provided and "image" not in cls.provides:
            raise FactoryError(
                f"a `latents` source has codes, not images, so its first stage must make images from them: "
                f"add `- name: sample_latent` (with the generator) before {spec.name!r}")
        if "latent" in cls.needs - provided and not any(src.kind == "shards" for src in recipe.sources):
            raise FactoryError(
                f"stage {spec.name!r} edits latent codes, but no stage before it gives the samples one: add "
                f"`- name: sample_latent` for a `latents` source, or `- name: invert` to bring real images in")
        if "caption" in cls.needs - provided:
            for src in recipe.sources:
                if src.kind == "world":  # every scene has its caption
                    continue
                spec_ = src.model_dump(mode="json")
                if src.kind == "shards":  # the first shard tells
                    spec_["path"] = shard_urls(src.path)[0]
                if not any(caption for _, caption, _ in source_captions(spec_)[:50]):
                    where = getattr(src, "path", src.kind)
                    raise FactoryError(
                        f"stage {spec.name!r} needs captions, but the source {where!r} has none and no "
                        f"`caption` stage comes before it: add `- name: caption` (BLIP-2) before "
                        f"{spec.name!r}, or give the source captions (txt members, or captions.json / "
                        f"ImageClasses_FSC147.txt in an FSC147 folder)")
        provided |= cls.provides


def run(
    recipe: Recipe,
    out: str,
    address: str | None = None,
    workers: int | None = None,
    progress=None,
    num_cpus: int | None = None,
) -> RunResult:
    """Run a recipe into ``out``; resumes a partial run of the same recipe."""
    t0 = time.time()
    preflight(recipe)
    plan: Plan = make_plan(recipe)
    outdir = OutputDir(out)
    outdir.claim(recipe)
    outdir.remove_partial()  # a killed run's temporary files; complete shards are kept
    done = outdir.completed()
    todo = set(range(plan.num_shards)) - done
    result = RunResult(out, len(plan.items), plan.num_shards, len(done), 0, warnings=plan.warnings)
    items = plan.items_of(todo)
    if items:
        init_ray(address, num_cpus)
        rows = to_batch([it.to_sample() for it in items])
        expected = {s: n for s, n in plan.shard_sizes().items() if s in todo}
        assembler = ShardAssembler(outdir, expected, recipe.output.image_format)
        ds = build_dataset(recipe, rows, workers)
        if progress:
            progress.start(len(items))
        first = last = None
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if first is None:
                    first = time.time()
                else:
                    result.running_samples += len(batch["key"])
                for i in range(len(batch["key"])):
                    status = json.loads(batch["status"][i])
                    members = pickle.loads(batch["members"][i]) if not status else None
                    _count(result, status)
                    assembler.add(int(batch["shard"][i]), int(batch["pos"][i]), str(batch["key"][i]), members, status)
                last = time.time()
                if progress:
                    progress.update(len(batch["key"]), result)
        except KeyboardInterrupt:
            outdir.remove_partial()
            raise FactoryError(
                f"interrupted: {len(done) + len(assembler.written)} of {plan.num_shards} shards are complete "
                f"in {out}; no partial shard was kept. Run the same command again to resume."
            ) from None
        finally:
            if progress:
                progress.stop()
        result.shards_written = len(assembler.written)
        result.startup_seconds = (first or time.time()) - t0
        result.running_seconds = (last - first) if first else 0.0
    missing = set(range(plan.num_shards)) - outdir.completed()
    if missing:
        raise FactoryError(f"{len(missing)} shards were not completed (e.g. {min(missing)}); rerun to resume")
    outdir.write_index(plan.num_shards)
    result.generated = sum(outdir.read_stats(i)["generated"] for i in range(plan.num_shards))
    result.seconds = time.time() - t0
    return result


def _count(result: RunResult, status: dict) -> None:
    for kind in ("failed", "filtered"):
        if status.get(kind):
            stage = status[kind]["stage"]
            getattr(result, kind)[stage] = getattr(result, kind).get(stage, 0) + 1
