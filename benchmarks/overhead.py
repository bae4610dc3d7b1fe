"""Factory overhead: `factory run` against a bare Python loop over the same stages.

Both process the same plan (default 5,000 samples: render -> augment ->
check_count, PNG encoding and shard writing) in one process run. The bare
loop calls the stage objects directly, one batch at a time, on one core; the
factory runs them as Ray Data actor pools. Reported: samples/s of each once
running (the factory's start-up, Ray and actor launch, is reported apart),
their ratio, and whether both wrote byte-identical shards.

    python benchmarks/overhead.py [--n 5000] [--workers 1]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.pipeline import init_ray, run  # noqa: E402
from factory.plan import make_plan  # noqa: E402
from factory.recipe import parse_recipe  # noqa: E402
from factory.sample import encode_members  # noqa: E402
from factory.shards import OutputDir, ShardAssembler  # noqa: E402
from factory.sources import SourceReader  # noqa: E402
from factory.stage import get_stage  # noqa: E402


def recipe_for(n: int, workers: int):
    return parse_recipe({
        "version": 1, "name": "overhead-benchmark", "seed": 0, "variants": 4,
        "sources": [{"kind": "world", "split": "train", "n": n // 4}],
        "stages": [
            {"name": "render", "workers": workers},
            {"name": "augment", "params": {"crop": 0.85, "resize": 64, "colour_jitter": 0.1}, "workers": workers},
            {"name": "check_count", "workers": workers},
        ],
        "output": {"shard_size": 500},
    })


def bare_loop(recipe, out: str, batch: int = 64) -> tuple[float, int]:
    plan = make_plan(recipe)
    stages = [SourceReader()] + [get_stage(s.name)(s.params, "cpu") for s in recipe.stages]
    outdir = OutputDir(out)
    outdir.claim(recipe)
    writer = ShardAssembler(outdir, {i: plan.shard_len(i) for i in range(plan.num_shards)}, recipe.output.image_format)
    t = time.perf_counter()
    for i in range(0, plan.total, batch):
        samples = [it.to_sample() for it in plan.rows(i, i + batch)]
        for stage in stages:
            stage.process([s for s in samples if s.alive])
        for s in samples:
            status = {k: s.meta[k] for k in ("failed", "filtered") if s.meta.get(k)}
            members = None if status else encode_members(s, recipe.output.image_format)
            writer.add(s.shard, s.pos, s.key, members, status)
    return time.perf_counter() - t, plan.total


def hashes(out: str) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).glob("shard-*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="samples (a multiple of 4)")
    ap.add_argument("--workers", type=int, default=1, help="actors per stage in the factory run")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    recipe = recipe_for(args.n, args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    try:
        bare_s, n = bare_loop(recipe, str(tmp / "bare"))
        t0 = time.perf_counter()
        init_ray()
        ray_init_s = time.perf_counter() - t0
        res = run(recipe, str(tmp / "factory"), workers=args.workers)
        factory_rate = res.running_samples / res.running_seconds
        bare_rate = n / bare_s
        report = {
            "samples": n,
            "bare_loop_samples_per_s": round(bare_rate, 1),
            "factory_running_samples_per_s": round(factory_rate, 1),
            "ratio_factory_over_bare": round(factory_rate / bare_rate, 3),
            "factory_whole_run_samples_per_s": round(n / (res.seconds + ray_init_s), 1),
            "factory_startup_s": round(res.startup_seconds + ray_init_s, 1),
            "ray_init_s": round(ray_init_s, 1),
            "workers_per_stage": args.workers,
            "identical_shards": hashes(str(tmp / "bare")) == hashes(str(tmp / "factory")),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
