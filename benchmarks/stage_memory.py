"""What each model stage's actor needs in memory: its peak RSS in real runs, on the shipped models.

Runs the shipped model recipes in miniature (4 source samples x 2 variants;
editors fitted on 400 codes) with `factory run`'s runner, a caption stage
on a tiny BLIP-2 built here (no BLIP-2 is shipped) and the pixel-level checks
(check_objects, check_realism, segment), sampling every actor's RSS
twice a second. Prints each stage's peak and the declaration it suggests
(peak + 25 %, rounded up to 64 MiB): the ``memory`` in the stage's
``resources``, so Ray never packs more actors on a node than fit. Real
models need more: a recipe raises it with ``resources: {memory: BYTES}``.

    python benchmarks/stage_memory.py [--only checks] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from factory.pipeline import init_ray, run  # noqa: E402
from factory.recipe import parse_recipe  # noqa: E402
from _rss import MB, RssSampler  # noqa: E402

RECIPES = ["semaug-mini", "attribute-edit", "invert-edit"]
STEP = 64 * MB


def miniature(name: str, tmp: Path) -> dict:
    r = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    r["variants"] = 2
    for src in r["sources"]:
        src["n"] = 4
    for stage in r["stages"]:
        params = stage.setdefault("params", {})
        if "n_fit" in params or stage["name"] == "edit":
            params["n_fit"] = min(params.get("n_fit", 400), 400)
            params["n0"] = min(params.get("n0", 100), 100)
            params["cache"] = str(tmp / "cache")
        params.pop("fit_data", None)
    r["output"] = {"shard_size": 8}
    return r


def caption_recipe(tmp: Path) -> dict:
    from factory.models.tiny_blip2 import build_tiny_blip2

    build_tiny_blip2(tmp / "blip2", seed=0)
    return {"version": 1, "name": "caption", "variants": 2, "sources": [{"kind": "world", "n": 4}],
            "stages": [{"name": "caption", "params": {"model": str(tmp / "blip2")}}], "output": {"shard_size": 8}}


def checks_recipe(tmp: Path) -> dict:
    """The pixel-level checks on real scenes: check_objects with the digit reader, check_realism
    (the shipped GMM-VAE) and segment (the shipped mask model when there is one, else the
    model-free rule)."""
    mask_model = "models/redo" if (ROOT / "models" / "redo").is_dir() else "pixel"
    return {"version": 1, "name": "checks", "variants": 2, "sources": [{"kind": "world", "n": 4}],
            "stages": [{"name": "check_objects", "params": {"digits": "models/digit-classifier"}},
                       {"name": "check_realism", "params": {"model": "models/realism"}},
                       {"name": "segment", "params": {"model": mask_model}}],
            "output": {"shard_size": 8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these miniatures (e.g. checks caption)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stage-memory-"))
    init_ray()
    peaks: dict[str, int] = {}
    try:
        makers = {**{name: (lambda n=name: miniature(n, tmp)) for name in RECIPES},
                  "caption": lambda: caption_recipe(tmp), "checks": lambda: checks_recipe(tmp)}
        unknown = set(args.only or []) - set(makers)
        if unknown:
            sys.exit(f"stage_memory: no miniature {', '.join(sorted(unknown))}; choose from {', '.join(makers)}")
        recipes = [(name, make()) for name, make in makers.items() if not args.only or name in args.only]
        for name, spec in recipes:
            sampler = RssSampler(0.5)
            sampler.start()
            try:
                res = run(parse_recipe(spec), str(tmp / f"out-{name}"))
            finally:
                sampler.stop()
            for actor, rss in sampler.peak_by_actor().items():
                peaks[actor] = max(peaks.get(actor, 0), rss)
            print(f"{name}: {res.generated} of {res.planned} samples", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {actor: {"peak_mb": round(rss / MB), "declare_bytes": math.ceil(rss * 1.25 / STEP) * STEP}
              for actor, rss in sorted(peaks.items())}
    print(f"{'actor':<28} {'peak RSS MB':>12} {'declare (bytes)':>16}")
    for actor, r in report.items():
        print(f"{actor:<28} {r['peak_mb']:>12} {r['declare_bytes']:>16}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
