"""Driver memory against plan size: `factory plan`, and `factory run --shards 0:2`, at 1e5-1e7 samples.

For each size N, a recipe with the demo's stages over N/10 reference-world
scenes x 10 variants in shards of 1,000. Each measurement runs in a fresh
process that reports its own peak RSS (``ru_maxrss``: the driver only, not
Ray's processes): ``factory plan`` (totals, first keys), then a run of the
plan's first two shards (2,000 samples), which also reports the bytes the
driver received from the workers. With ``--base DIR`` (a checkout of an older
version) its ``factory plan`` is measured too, for comparison.

    python benchmarks/plan_scale.py [--sizes 100000 1000000 10000000] [--base DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def recipe_file(n: int, folder: Path) -> Path:
    demo = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    demo.update(name=f"scale-{n}", variants=10, sources=[{"kind": "world", "split": "train", "n": n // 10}])
    demo["output"] = {"shard_size": 1000, "image_format": "png"}
    path = folder / f"scale-{n}.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    return path


def child(kind: str, recipe: str, out: str) -> None:
    """In the measured process: do one thing, print what it cost."""
    t = time.time()
    report = {}
    if kind == "plan":
        from factory.cli import main

        with open(os.devnull, "w") as devnull:
            sys.stdout = devnull
            code = main(["plan", recipe])
            sys.stdout = sys.__stdout__
        report["exit"] = code
    else:
        from factory.pipeline import run
        from factory.recipe import load_recipe

        res = run(load_recipe(recipe), out, shards="0:2")
        report.update(samples=res.planned, ran=2 * 1000, record_bytes=res.record_bytes,
                      record_bytes_per_sample=round(res.record_bytes / 2000, 1))
    report.update(seconds=round(time.time() - t, 1),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1))
    print(json.dumps(report))


def measure(kind: str, recipe: Path, out: Path, root: Path = ROOT) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(recipe), str(out)],
                         cwd=root, env=env, capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1][:300] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, os.environ["PYTHONPATH"])
        return child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--base", help="an older checkout whose `factory plan` to measure as well")
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="plan-scale-"))
    rows = []
    for n in args.sizes:
        recipe = recipe_file(n, tmp)
        row = {"planned": n, "plan": measure("plan", recipe, tmp / "x"),
               "run_shards_0_2": measure("run", recipe, tmp / f"out-{n}")}
        if args.base:
            row["plan_base"] = measure("plan", recipe, tmp / "x", Path(args.base))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
