"""SemAug downstream utility (the paper's headline): does a counter trained on a few-shot
real set get better when the set's synthetic variants are mixed in?

1. The real set: N_real train-pool scenes (default 200) written as shards.
2. One synthetic set per caption-swap setting (p_c, t_c), made by `factory run` of the
   SemAug recipe on those shards: swap_caption -> generate (density ControlNet) ->
   check_count, M variants per scene (default 10). Each set lives in
   ``--synthetic DIR/pc<p_c>-tc<t_c>`` (``pc0`` for p_c = 0) and is reused when present (a run of the same
   recipe resumes or skips; a different recipe into the same folder is refused).
   p_c = 0 never swaps, so it makes one set whatever t_c; t_c = 0 is a random swap.
3. For each seed (default 3), a DensityCounter trained for the same steps at the same
   batch size: real only (ShardDataset: only real images), and real + synthetic
   through the p0 loader (MixingDataset, each real sample replaced with probability
   p0 = 0.5 by one of its variants), for each setting.
4. Scored on N_test test-pool scenes (default 1000; handwriting never trained on):
   mean ± std over seeds of MAE and RMSE, and the relative MAE gain over real only.

    python benchmarks/semaug_utility.py [--pc 0.5] [--tc 0.7] [--variants 10] \\
        [--train-steps 1500] [--seeds 3] [--synthetic out/semaug-utility/synthetic] [--json report.json]
    python benchmarks/semaug_utility.py --pc 0 0.5 0.7 --tc 0 0.7     # the swap ablation

Tiny check: --n-real 8 --variants 2 --gen-steps 2 --train-steps 5 --batch 4 --n-test 16 --seeds 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.evaluation.utility import counting_errors, semaug_recipe, train_counter_on  # noqa: E402
from factory.loaders import ShardDataset  # noqa: E402
from factory.train.data import load_training_set  # noqa: E402
from factory.world.export import write_world_shards  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings(pcs: list[float], tcs: list[float]) -> list[tuple[float, float]]:
    """(p_c, t_c) pairs; p_c = 0 once (no variant swaps, so t_c changes nothing)."""
    out = []
    for pc in pcs:
        for tc in ([tcs[0]] if pc == 0 else tcs):
            if (pc, tc) not in out:
                out.append((pc, tc))
    return out


def setting_name(pc: float, tc: float) -> str:
    return "pc0" if pc == 0 else f"pc{pc:g}-tc{tc:g}"


def real_set(work: Path, n: int) -> str:
    folder = work / f"real-train-{n}"
    write_world_shards("train", n, str(folder))  # resumes; refuses a folder holding other scenes
    return str(folder)


def synthetic_set(args, real_dir: str, pc: float, tc: float) -> tuple[str, dict]:
    """Generate (or reuse) the synthetic variants of one setting; returns the folder and its stats."""
    from factory.pipeline import run

    folder = Path(args.synthetic) / setting_name(pc, tc)
    recipe = semaug_recipe(real_dir, args.variants, pc, tc, args.model, args.controlnet, f"openclip:{args.clip}",
                           args.gen_steps, args.check_counter, args.tolerance, args.recipe_seed)
    log(f"synthetic set {folder.name}: {args.n_real} scenes x {args.variants} variants")
    res = run(recipe, str(folder), workers=args.workers, num_cpus=args.num_cpus)
    stats = {"dir": str(folder), "generated": res.generated, "planned": res.planned,
             "reused_shards": res.shards_skipped, "seconds": round(res.seconds, 1),
             "failed": res.failed, "filtered": res.filtered, **label_stats(str(folder))}
    log(f"  {json.dumps(stats)}")
    return str(folder), stats


def label_stats(folder: str) -> dict:
    """How many variants swapped their caption, and how many the checker counted right."""
    swapped = exact = n = 0
    for raw in ShardDataset(folder).raw_samples():
        labels = json.loads(raw["json"])
        n += 1
        swapped += bool(labels.get("caption_swap", {}).get("swapped"))
        exact += bool(labels.get("checks", {}).get("count", {}).get("exact"))
    return {"swapped_share": round(swapped / max(n, 1), 4), "checker_exact_share": round(exact / max(n, 1), 4)}


def arm_cache(args, name: str, seed: int) -> Path:
    """Where one trained arm's scores are kept, so a later ablation reuses the headline's runs."""
    keys = ("n_real", "n_test", "variants", "gen_steps", "model", "controlnet", "clip", "check_counter",
            "tolerance", "recipe_seed", "p0", "train_steps", "batch", "lr", "width", "depth")
    blob = json.dumps({k: getattr(args, k) for k in keys} | {"arm": name, "seed": seed}, sort_keys=True)
    return Path(args.work) / "arms" / f"{name}-seed{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.json"


def train_arm(args, real_dir: str, synthetic_dir: str | None, test, name: str) -> dict:
    runs = []
    for seed in range(args.seeds):
        cache = arm_cache(args, name, seed)
        if cache.exists():
            runs.append(json.loads(cache.read_text()))
            log(f"  {name} seed {seed} (cached): {json.dumps(runs[-1])}")
            continue
        tc = train_counter_on(real_dir, synthetic_dir, p0=args.p0, steps=args.train_steps, batch=args.batch,
                              seed=seed, lr=args.lr, width=args.width, depth=args.depth)
        errors = counting_errors(tc.model, test)
        errors = {k: round(v, 4) if isinstance(v, float) else v for k, v in errors.items()}
        runs.append({"seed": seed, **errors, "synthetic_share_seen": round(tc.synthetic_seen / tc.samples_seen, 4),
                     "train_seconds": round(tc.seconds, 1)})
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(runs[-1]))
        log(f"  {name} seed {seed}: {json.dumps(runs[-1])}")
    return summarise(runs)


def summarise(runs: list[dict]) -> dict:
    def mean_std(k):
        v = np.array([r[k] for r in runs])
        return round(float(v.mean()), 4), round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)

    (mae, mae_sd), (rmse, rmse_sd), (exact, _) = mean_std("mae"), mean_std("rmse"), mean_std("exact")
    return {"mae_mean": mae, "mae_std": mae_sd, "rmse_mean": rmse, "rmse_std": rmse_sd, "exact_mean": exact,
            "synthetic_share_seen": mean_std("synthetic_share_seen")[0], "per_seed": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--n-real", type=int, default=200, help="few-shot real training scenes (train pool)")
    g.add_argument("--n-test", type=int, default=1000, help="test-pool scenes to score on")
    g.add_argument("--work", default="out/semaug-utility", help="folder for the real shards")
    g.add_argument("--synthetic", default=None, help="cache of synthetic sets, one subfolder per setting "
                                                    "(default WORK/synthetic)")
    g = ap.add_argument_group("synthetic variants (factory run of the SemAug recipe)")
    g.add_argument("--pc", type=float, nargs="+", default=[0.5], help="p_c values: caption-swap probability")
    g.add_argument("--tc", type=float, nargs="+", default=[0.7], help="t_c values: least caption similarity "
                                                                      "(0 = random swap)")
    g.add_argument("--variants", type=int, default=10, help="M: variants per real scene")
    g.add_argument("--gen-steps", type=int, default=20, help="DDIM steps")
    g.add_argument("--model", default="models/tiny-sd")
    g.add_argument("--controlnet", default="models/tiny-controlnet")
    g.add_argument("--clip", default="models/tiny-clip", help="OpenCLIP folder for caption similarity")
    g.add_argument("--check-counter", default="pixel", help="check_count counter: pixel or a counter folder")
    g.add_argument("--tolerance", type=int, default=None, help="drop variants whose recount is off by more "
                                                               "(default: keep all, as in the paper)")
    g.add_argument("--recipe-seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=None, help="actors per stage")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    g = ap.add_argument_group("counter training")
    g.add_argument("--p0", type=float, default=0.5, help="chance a real sample is replaced by a variant")
    g.add_argument("--train-steps", type=int, default=1500)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--width", type=int, default=32)
    g.add_argument("--depth", type=int, default=5)
    g.add_argument("--seeds", type=int, default=3, help="training seeds per arm (0 .. N-1)")
    g.add_argument("--threads", type=int, default=None, help="torch threads for training")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    args.synthetic = args.synthetic or str(Path(args.work) / "synthetic")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t0 = time.time()
    real_dir = real_set(Path(args.work), args.n_real)
    synthetic = {setting_name(pc, tc): synthetic_set(args, real_dir, pc, tc) for pc, tc in settings(args.pc, args.tc)}
    test = load_training_set(f"world:test:{args.n_test}")

    log("training: real only")
    arms = {"real_only": train_arm(args, real_dir, None, test, "real_only")}
    base = arms["real_only"]["mae_mean"]
    for name, (folder, stats) in synthetic.items():
        log(f"training: real + {name}")
        arm = train_arm(args, real_dir, folder, test, name)
        arm["relative_mae_gain"] = round((base - arm["mae_mean"]) / base, 4) if base else None
        arms[name] = {**arm, "synthetic": stats}
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "arms": arms,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
