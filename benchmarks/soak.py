"""Soak: does memory stay flat? The demo's stages over many samples, RSS sampled as it runs.

Runs ``--n`` samples (default 20,000: reference-world scenes x 4 variants through
render -> augment -> check_count, shards of 100) with `factory run`'s runner in
this process, and records the driver's RSS and every actor's every
``--interval`` seconds. After warm-up (the first ``--warmup`` of the samples),
it compares the median of the first three samples with that of the last three:
neither the driver nor any actor may grow by more than 10 %. Prints the curve
as a table and the verdict.

    python benchmarks/soak.py [--n 20000] [--interval 3] [--window SAMPLES] [--json soak.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from factory.pipeline import init_ray, run  # noqa: E402
from factory.recipe import parse_recipe  # noqa: E402
from _rss import MB, RssSampler  # noqa: E402

LIMIT = 0.10


def demo_recipe(n: int):
    demo = __import__("yaml").safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    demo["sources"] = [{"kind": "world", "split": "train", "n": n // demo["variants"]}]
    demo["name"] = "soak"
    demo["output"].pop("path", None)
    return parse_recipe(demo)


class Count:
    """A progress sink for the runner: counts samples done."""

    def __init__(self):
        self.done = 0

    def start(self, total):
        pass

    def update(self, n, result):
        self.done += n

    def stop(self):
        pass


def growth(series: list[float]) -> float:
    first, last = statistics.median(series[:3]), statistics.median(series[-3:])
    return last / first - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="samples (a multiple of 4)")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the samples treated as warm-up")
    ap.add_argument("--window", type=int, help="samples per Ray Data execution (factory.pipeline.WINDOW_SAMPLES)")
    ap.add_argument("--json", help="also write the curve and verdict here")
    args = ap.parse_args()
    if args.window:
        import factory.pipeline

        factory.pipeline.WINDOW_SAMPLES = args.window
    recipe = demo_recipe(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    count = Count()
    init_ray()
    sampler = RssSampler(args.interval, progress=lambda: count.done)
    sampler.start()
    t0 = time.time()
    try:
        result = run(recipe, str(tmp / "out"), progress=count)
    finally:
        sampler.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    # Only samples taken while the stream ran past warm-up (the end: pools scale down).
    steady = [s for s in sampler.samples if args.warmup * args.n <= s[1] < args.n]
    names = sorted({name for *_, actors in steady for name, _ in actors.values()})

    def per_name(actors: dict, name: str) -> float:
        return sum(rss for n, rss in actors.values() if n == name) / MB

    rows = [{"s": round(t, 1), "samples": done, "driver_mb": round(rss / MB, 1),
             **{name: round(per_name(actors, name), 1) for name in names}}
            for t, done, rss, actors in sampler.samples]
    verdict = {"driver": growth([s[2] / MB for s in steady])}
    for name in names:
        verdict[name] = growth([per_name(s[3], name) for s in steady])
    report = {
        "samples": result.planned, "generated": result.generated, "seconds": round(time.time() - t0, 1),
        "steady_samples": len(steady), "growth_after_warmup": {k: round(v, 4) for k, v in verdict.items()},
        "flat": all(v <= LIMIT for v in verdict.values()), "curve": rows,
    }
    step = max(1, len(rows) // 12)
    print(f"{'s':>7} {'samples':>8} {'driver MB':>10} " + " ".join(f"{n[:14]:>14}" for n in names))
    for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        print(f"{r['s']:>7} {r['samples']:>8} {r['driver_mb']:>10} " + " ".join(f"{r.get(n, 0):>14}" for n in names))
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
