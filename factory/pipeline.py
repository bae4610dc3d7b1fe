"""The runner: plan rows through Ray Data stages into shards written on the workers.

    plan (read tasks make each shard's rows) ─► read ─► stage 1 ─► … ─► stage n
        ─► stage to output (workers) ─► completion records ─► driver ─► shard writer actors

Each stage is a ``map_batches`` over an actor pool (one model load per actor)
sized from the recipe and the cluster's resources. Ray Data streams with
backpressure; rows may finish in any order. The last stage stages each
sample's encoded members under the output and returns a record of a few
bytes; when every row of a shard is staged, the driver hands it to a writer actor
that writes the shard in plan order (:mod:`factory.shard_writer`), so the bytes do
not depend on scheduling, and no sample passes through the driver.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FactoryError
from .lease import Lease
from .output_errors import OutputWriteError, fault_message, find_write_error, writing
from .plan import Plan, make_plan, parse_shard_range
from .recipe import Recipe, StageSpec
from .shard_writer import ShardStager, ShardTracker, ShardWriters
from .shards import OutputDir
from .sources import SourceReader
from .staging import remove_empty_staging
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
    running_seconds: float = 0.0  # first batch out to the last shard written
    running_samples: int = 0  # samples that came out after the first batch
    warnings: list = field(default_factory=list)
    shards: range = range(0)  # the range this run was given (--shards)
    missing: int = 0  # shards of the plan not complete yet (other ranges still to run)
    record_bytes: int = 0  # what the driver received from the workers: completion records only


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _few_malloc_arenas()
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


def _few_malloc_arenas() -> None:
    """Two malloc arenas for the driver's threads instead of glibc's eight per core.

    Ray's threads in the driver each allocate from an arena of their own, and what they free
    there is not reused by the others: the driver grew by about 0.45 KB a sample, for good
    (0.2 MB per 1,000 blocks of a bare Ray Data pipeline, not returned when its execution ends;
    with MALLOC_ARENA_MAX=2, 0.02). Must run before Ray starts its threads."""
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class _DropProgressNotice(logging.Filter):
    """Ray Data's notice that progress bars are off, and its errors: a failed stream is raised to
    the runner, which tells it as one paragraph (the full log stays in the session's log files)."""

    def filter(self, record):
        return record.levelno < logging.ERROR and "Progress bars disabled" not in record.getMessage()


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
# Samples per Ray Data execution. Ray Data's executor keeps statistics for every block it
# produced for as long as the execution lives (measured with tracemalloc: 45 bytes a sample in
# the driver, 450 MB over ten million); a long run is streamed as a series of executions of
# this size, which releases them. Each starts the stages' actor pools anew: the pause of a model
# load per million samples.
WINDOW_SAMPLES = 1_000_000
READ_TASK_CPUS = 0.25  # Ray Data's input tasks need room beside the actor pools


def cpu_scale(requests: list[float], cluster_cpus: float) -> float:
    """Factor (<= 1) that makes one actor of every stage fit in the cluster's CPUs.

    Every pool starts at least one actor, all at once; asked for more CPUs than
    the cluster has, one never starts and the stream deadlocks (2-CPU machines
    with a 1-CPU generator did). Requests are scaled down together instead.
    """
    total = sum(requests) + ENCODER_CPUS + READ_TASK_CPUS
    return min(1.0, cluster_cpus / total) if cluster_cpus > 0 else 1.0


def memory_scale(requests: list[int], cluster_memory: float) -> float:
    """Factor (<= 1) that makes one actor of every stage fit in the cluster's memory.

    Stages declare what their actors need, measured on the shipped models; on a machine with
    less memory than one actor of each, requests are scaled down together (as CPUs are) rather
    than leaving an actor pool that can never start."""
    total = sum(requests)
    return min(1.0, cluster_memory / total) if total and cluster_memory > 0 else 1.0


def _actor_options(spec: StageSpec, cls: type[Stage], gpus: float, workers: int | None, context: dict,
                   cpu_factor: float = 1.0, memory_factor: float = 1.0) -> dict:
    from ray.data import ActorPoolStrategy

    res: Resources = spec.resources or cls.resources
    num_gpus = res.num_gpus if gpus > 0 else 0.0  # no GPU in the cluster: the same code on the CPU
    size = workers or spec.workers or 1
    if num_gpus > 0:
        size = max(1, min(size if (workers or spec.workers) else 10**6, math.floor(gpus / num_gpus)))
    # Bytes an actor needs: Ray places no more actors on a node than fit.
    extra = {"memory": int(res.memory * memory_factor)} if res.memory else {}
    return dict(
        compute=ActorPoolStrategy(min_size=1, max_size=size),
        num_cpus=round(res.num_cpus * cpu_factor, 4),
        num_gpus=num_gpus,
        **extra,
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


def build_dataset(recipe: Recipe, plan: Plan, shards: list[int], out: str, workers: int | None = None):
    """The stream for ``shards`` of the plan, ending in completion records (shard, pos, status)."""
    import ray

    from .plan_read import PlanDatasource

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    gpus = cluster_gpus()
    context = {"sources": [s.model_dump(mode="json") for s in recipe.sources], "seed": recipe.seed}
    specs = [(spec, SourceReader if spec is READ_SPEC else get_stage(spec.name)) for spec in [READ_SPEC, *recipe.stages]]
    factor = cpu_scale([(spec.resources or cls.resources).num_cpus for spec, cls in specs],
                       float(ray.cluster_resources().get("CPU", 0)))
    mem_factor = memory_scale([(spec.resources or cls.resources).memory for spec, cls in specs],
                              float(ray.cluster_resources().get("memory", 0)))
    ds = ray.data.read_datasource(PlanDatasource(plan, shards),
                                  ray_remote_args={"num_cpus": round(READ_TASK_CPUS * factor, 4)})
    for spec, cls in specs:
        ds = ds.map_batches(cls, **_actor_options(spec, cls, gpus, workers, context, factor, mem_factor))
    return ds.map_batches(
        ShardStager, fn_constructor_kwargs={"out": out, "image_format": recipe.output.image_format},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers or 1),
        num_cpus=round(ENCODER_CPUS * factor, 4), batch_size=64, max_restarts=-1, max_task_retries=-1,
    )


def preflight(recipe: Recipe) -> None:
    """Refuse a run whose stages need captions, latent codes or per-object labels (points) that the
    sources lack and no earlier stage provides, or models named by hub ids that cannot be fetched,
    before any model loads."""
    from .hub import check_hub_models
    from .sources import shard_urls, source_captions

    provided: set[str] = set()
    latents = [src for src in recipe.sources if src.kind == "latents"]
    for spec in recipe.stages:
        cls = get_stage(spec.name)
        needs = cls.needs_with(spec.params)
        if latents and "image" not in provided and "image" not in cls.provides:
            raise FactoryError(
                f"a `latents` source has codes, not images, so its first stage must make images from them: "
                f"add `- name: sample_latent` (with the generator) before {spec.name!r}")
        if "latent" in needs.keys() - provided and not any(src.kind == "shards" for src in recipe.sources):
            raise FactoryError(
                f"stage {spec.name!r} edits latent codes, but no stage before it gives the samples one: add "
                f"`- name: sample_latent` for a `latents` source, or `- name: invert` to bring real images in")
        if "caption" in needs.keys() - provided:
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
        if "points" in needs.keys() - provided:
            for src in recipe.sources:
                if not _source_has_points(src):
                    where = getattr(src, "path", src.kind)
                    raise FactoryError(
                        f"stage {spec.name!r} needs per-object labels (points, and boxes where there are "
                        f"some), but the source {where!r} has none: "
                        f"{needs['points'] or 'it checks ink against labelled objects'}. "
                        f"Use it on reference-world scenes, FSC147 folders or shards whose labels have "
                        f"points, or drop it from the recipe")
        provided |= cls.provides
    # Last: the checks above need no network and name a mistake in the recipe itself.
    check_hub_models(recipe)


def _source_has_points(src) -> bool:
    """World scenes and FSC147 annotations have points; codes do not; a shard set tells by its first sample."""
    if src.kind in ("world", "fsc147"):
        return True
    if src.kind == "shards":
        import fsspec

        from .sources import shard_urls, tar_members

        url = shard_urls(src.path)[0]
        members, _ = tar_members(url)
        with fsspec.open(url, "rb") as f:
            for exts in members.values():
                if "json" in exts:
                    off, size = exts["json"]
                    f.seek(off)
                    return "points" in json.loads(f.read(size))
        return False
    return False


def run(
    recipe: Recipe,
    out: str,
    address: str | None = None,
    workers: int | None = None,
    progress=None,
    num_cpus: int | None = None,
    shards: str | None = None,
    notify=None,
) -> RunResult:
    """Run a recipe (or the ``shards`` range ``"A:B"`` of its plan) into ``out``; resumes a partial
    run of the same recipe. ``notify`` gets one-line notes (a stale lease taken over)."""
    t0 = time.time()
    preflight(recipe)
    plan: Plan = make_plan(recipe)
    span = parse_shard_range(shards, plan.num_shards)
    outdir = OutputDir(out)
    try:
        with writing(outdir.url, "the manifest and lease"):
            claimed = outdir.check_claim(recipe.content_hash(), recipe.name)
        lease = Lease.acquire(outdir, span, notify=notify or _note)
    except OutputWriteError as e:
        raise FactoryError(f"cannot use the output {e.url}: {e.cause}. Nothing was written; fix the cause "
                           f"and run again.") from None
    result = None
    try:
        result = _run_leased(recipe, plan, span, outdir, lease, claimed, t0, address, workers, progress, num_cpus)
        return result
    finally:
        lease.release(tidy=result is not None and not result.missing)


def _note(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


def _run_leased(recipe, plan, span, outdir, lease, claimed, t0, address, workers, progress, num_cpus) -> RunResult:
    whole = len(span) == plan.num_shards
    with _output_faults(outdir, plan, span, recipe):
        if not claimed:
            outdir.write_manifest(recipe.resolved(), recipe.content_hash(),
                                  {"samples": plan.total, "shards": plan.num_shards, "shard_size": plan.shard_size})
        # A killed run's temporary files and staged samples; complete shards are kept. Only this
        # run's range: another range may belong to a live run.
        outdir.remove_partial(None if whole else span)
        done = outdir.completed()
    todo = [s for s in span if s not in done]
    result = RunResult(outdir.url, plan.total, plan.num_shards, len(span) - len(todo), 0,
                       warnings=plan.warnings, shards=span)
    if todo:
        init_ray(address, num_cpus)
        _stream(recipe, plan, span, todo, outdir, lease, result, workers, progress, t0)
    with _output_faults(outdir, plan, span, recipe):
        complete = outdir.completed()
        missing_here = [s for s in span if s not in complete]
        if missing_here:
            raise FactoryError(f"{len(missing_here)} shards were not completed (e.g. {missing_here[0]}); "
                               f"rerun to resume")
        result.missing = plan.num_shards - len(complete & set(range(plan.num_shards)))
        if not result.missing:
            outdir.write_index(plan.num_shards)  # whichever range finishes the plan writes it
            remove_empty_staging(outdir)
        result.generated = sum(outdir.read_stats(i)["generated"] for i in span)
    result.seconds = time.time() - t0
    return result


def _stream(recipe, plan, span, todo, outdir, lease, result, workers, progress, t0) -> None:
    """Run the stream for the shards ``todo``; the driver sees completion records only."""
    import ray

    tracker = ShardTracker(plan.shard_len)
    writers = ShardWriters(outdir.url, actors=max(1, min(4, sum(n["Alive"] for n in ray.nodes()))))
    if progress:
        progress.start(sum(plan.shard_len(s) for s in todo))
    first = last = None
    per_window = max(1, WINDOW_SAMPLES // plan.shard_size)
    try:
        for w in range(0, len(todo), per_window):
            ds = build_dataset(recipe, plan, todo[w: w + per_window], outdir.url, workers)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch["shard"])
                if first is None:
                    first = time.time()
                else:
                    result.running_samples += n
                result.record_bytes += _record_bytes(batch)
                fault = next((f for f in batch["fault"] if f), None)
                if fault:
                    raise OutputWriteError(**json.loads(fault))
                for status in batch["status"]:
                    if status:
                        _count(result, json.loads(status))
                for shard, started in tracker.add(batch["shard"], batch["pos"]):
                    result.shards_written += len(writers.submit(shard, plan.shard_len(shard), started))
                result.shards_written += len(writers.poll())
                last = time.time()
                lease.check()
                if progress:
                    progress.update(n, result)
            del ds  # its executor's per-block bookkeeping goes with it
        result.shards_written += len(writers.drain())
        last = time.time()  # the last shard is written: the run's work is done
    except KeyboardInterrupt:
        _abort(outdir, span, writers, plan)
        raise FactoryError(
            f"interrupted: {len(outdir.completed() & set(range(plan.num_shards)))} of {plan.num_shards} shards "
            f"are complete in {outdir.url}; no partial shard was kept. Run the same command again to resume."
        ) from None
    except FactoryError:
        _abort(outdir, span, writers, plan)
        raise
    except Exception as e:  # noqa: BLE001 - told as one paragraph below, or re-raised
        _abort(outdir, span, writers, plan)
        raise _stopped(e, outdir, plan, span, recipe) from None
    finally:
        writers.close()
        if progress:
            progress.stop()
    result.startup_seconds = (first or time.time()) - t0
    result.running_seconds = (last - first) if first else 0.0


def _record_bytes(batch: dict) -> int:
    """Bytes of the records a batch brought to the driver (numbers and status strings)."""
    return sum(col.nbytes if col.dtype != object else sum(len(x) for x in col) for col in batch.values())


def _abort(outdir: OutputDir, span: range, writers: ShardWriters, plan: Plan) -> None:
    """After a failure: let shard writers in flight finish (briefly), then remove this run's partial
    files. Best effort: the output itself may be what failed."""
    try:
        writers.settle(timeout=30)
    except Exception:  # noqa: BLE001
        pass
    try:
        outdir.remove_partial(None if len(span) == plan.num_shards else span)
    except Exception:  # noqa: BLE001
        pass


def _command(recipe, outdir: OutputDir, span: range, plan: Plan) -> str:
    shards = "" if len(span) == plan.num_shards else f" --shards {span.start}:{span.stop}"
    return f"factory run RECIPE --out {outdir.url}{shards}"


def _stopped(e: BaseException, outdir: OutputDir, plan: Plan, span: range, recipe) -> Exception:
    """A failure in the stream as one paragraph: a write fault, or Ray losing a node or worker."""
    complete = len(_safe_completed(outdir) & set(range(plan.num_shards)))
    fault = find_write_error(e)
    if fault:
        return FactoryError(fault_message(fault, complete, plan.num_shards, _command(recipe, outdir, span, plan)))
    if _lost_work(e):
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return FactoryError(
            f"the run stopped: Ray lost work it could not recover ({type(e).__name__}: {first}), e.g. a node "
            f"died. {complete} of {plan.num_shards} shards are complete in {outdir.url} and were kept; no "
            f"partial shard was left. Run the same command again to resume: "
            f"{_command(recipe, outdir, span, plan)}")
    return e


def _lost_work(e: BaseException) -> bool:
    """Ray's errors for work lost with a node, a worker or an object, however wrapped; not a bug in
    a stage (a UserCodeException), which keeps its traceback."""
    import ray.exceptions as rex

    lost = (rex.NodeDiedError, rex.WorkerCrashedError, rex.ActorDiedError, rex.ActorUnavailableError,
            rex.ObjectLostError, rex.OwnerDiedError, rex.RaySystemError, rex.ObjectFetchTimedOutError)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, lost):
            return True
        if isinstance(e, rex.UserCodeException):
            return False
        inner = getattr(e, "cause", None)
        e = inner if isinstance(inner, BaseException) else (e.__cause__ or e.__context__)
    return False


def _safe_completed(outdir: OutputDir) -> set[int]:
    try:
        return outdir.completed()
    except Exception:  # noqa: BLE001 - the output may be what failed
        return set()


@contextmanager
def _output_faults(outdir: OutputDir, plan: Plan, span: range, recipe):
    """Driver-side writes (manifest, clean-up, index): a failure is told like a worker's."""
    try:
        with writing(outdir.url, "the output's own files (manifest, clean-up, index)"):
            yield
    except OutputWriteError as e:
        try:
            outdir.remove_partial(None if len(span) == plan.num_shards else span)
        except Exception:  # noqa: BLE001 - best effort: the output is what failed
            pass
        complete = len(_safe_completed(outdir) & set(range(plan.num_shards)))
        raise FactoryError(fault_message(e, complete, plan.num_shards, _command(recipe, outdir, span, plan))) from None


def _count(result: RunResult, status: dict) -> None:
    for kind in ("failed", "filtered"):
        if status.get(kind):
            stage = status[kind]["stage"]
            getattr(result, kind)[stage] = getattr(result, kind).get(stage, 0) + 1
