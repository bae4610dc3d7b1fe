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
4. Scored on N_test test-pool scenes (default 1000; handwriting never trained on) and, with
   --test-start, on a second set of test-pool scenes from that index (other layouts, colours
   and handwriting draws): mean ± std over seeds of MAE and RMSE, the relative MAE gain over
   real only, and its 95 % interval over seeds (paired: real-only and mixed arms share each
   seed's initialisation and batches; Student t).

A gain seen with one counter, one seed set and one test set is a direction, not a result:
--arch trains every arm with each counter architecture given (density: the DensityCounter,
full-resolution density; quarter: strided, density at quarter resolution). --filter drops
variants before training: those the pixel object check fails (objects), that the GMM-VAE
realism filter rejects (realism), or either (both), to measure what label noise and the
realism gap cost.

    python benchmarks/semaug_utility.py [--pc 0.5] [--tc 0.7] [--variants 10] \\
        [--train-steps 1500] [--seeds 3] [--synthetic out/semaug-utility/synthetic] [--json report.json]
    python benchmarks/semaug_utility.py --pc 0 0.5 0.7 --tc 0 0.7     # the swap ablation
    python benchmarks/semaug_utility.py --arch density quarter --filter none objects both --seeds 5 \
        --test-start 500000                                           # two counters, filters, two test sets

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

from factory.evaluation.fidelity import SHIPPED_SAMPLER, sampler_settings  # noqa: E402
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


def setting_name(pc: float, tc: float, filter: str = "none") -> str:
    name = "pc0" if pc == 0 else f"pc{pc:g}-tc{tc:g}"
    return name if filter == "none" else f"{name}-{filter}"


def real_set(work: Path, n: int) -> str:
    folder = work / f"real-train-{n}"
    write_world_shards("train", n, str(folder))  # resumes; refuses a folder holding other scenes
    return str(folder)


def synthetic_set(args, real_dir: str, pc: float, tc: float, filter: str = "none") -> tuple[str, dict]:
    """Generate (or reuse) the synthetic variants of one setting; returns the folder and its stats."""
    from factory.pipeline import run

    from factory.latent.editors import model_fingerprint

    # The generator's weights are part of the name: a retrained model at the same path makes a new set
    # (its recipe is the same text, so `factory run` would otherwise resume the old images).
    # So are the sampler settings: the same weights sampled another way draw other images.
    weights = hashlib.sha256((model_fingerprint(args.model) + model_fingerprint(args.controlnet)
                              + json.dumps(sampler(args), sort_keys=True)).encode()).hexdigest()[:8]
    folder = Path(args.synthetic) / f"{setting_name(pc, tc, filter)}-{weights}"
    recipe = semaug_recipe(real_dir, args.variants, pc, tc, args.model, args.controlnet, f"openclip:{args.clip}",
                           sampler(args), args.check_counter, args.tolerance, args.recipe_seed,
                           filter=filter, realism=args.realism)
    log(f"synthetic set {folder.name}: {args.n_real} scenes x {args.variants} variants")
    res = run(recipe, str(folder), workers=args.workers, num_cpus=args.num_cpus)
    stats = {"dir": str(folder), "generated": res.generated, "planned": res.planned,
             "reused_shards": res.shards_skipped, "seconds": round(res.seconds, 1),
             "failed": res.failed, "filtered": res.filtered, **label_stats(str(folder))}
    log(f"  {json.dumps(stats)}")
    return str(folder), stats


def sampler(args) -> dict:
    """The generate stage's sampler settings."""
    return sampler_settings(args.gen_steps, args.guidance, args.control_scale, args.eta, args.condition_sigma)


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
    keys = ("n_real", "variants", "gen_steps", "model", "controlnet", "clip", "check_counter",
            "tolerance", "recipe_seed", "p0", "train_steps", "batch", "lr", "width", "depth")
    # Model folders by content: a retrained generator at the same path is another arm.
    from factory.latent.editors import model_fingerprint

    blob = {k: getattr(args, k) for k in keys} | {"arm": name, "seed": seed, "test": args.test_key,
                                                  "models": [model_fingerprint(args.model),
                                                             model_fingerprint(args.controlnet)]}
    if not name.endswith("real_only"):  # the real-only arm draws no variant: any sampler shares it
        blob["sampler"] = sampler(args)
    blob = json.dumps(blob, sort_keys=True)
    return Path(args.work) / "arms" / f"{name}-seed{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.json"


def train_arm(args, real_dir: str, synthetic_dir: str | None, tests: dict, name: str, arch: str) -> dict:
    """One arm, every seed, scored on every test set: {test set: summary}."""
    runs: dict[str, list] = {t: [] for t in tests}
    for seed in range(args.seeds):
        cache = arm_cache(args, f"{arch}-{name}", seed)
        if cache.exists():
            cached = json.loads(cache.read_text())
            for t in tests:
                runs[t].append(cached[t])
            log(f"  {arch} {name} seed {seed} (cached)")
            continue
        tc = train_counter_on(real_dir, synthetic_dir, p0=args.p0, steps=args.train_steps, batch=args.batch,
                              seed=seed, lr=args.lr, width=args.width, depth=args.depth, arch=arch)
        row = {}
        for t, test in tests.items():
            errors = counting_errors(tc.model, test)
            errors = {k: round(v, 4) if isinstance(v, float) else v for k, v in errors.items()}
            row[t] = {"seed": seed, **errors, "synthetic_share_seen": round(tc.synthetic_seen / tc.samples_seen, 4),
                      "train_seconds": round(tc.seconds, 1)}
            runs[t].append(row[t])
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(row))
        log(f"  {arch} {name} seed {seed}: {json.dumps(row)}")
    return {t: summarise(r) for t, r in runs.items()}


def paired_gain(base: dict, arm: dict) -> dict:
    """Relative MAE gain of ``arm`` over ``base`` (the real-only arm) per seed, its mean and its
    95 % interval over seeds (Student t; both arms share each seed)."""
    from scipy import stats

    b = np.array([r["mae"] for r in base["per_seed"]])
    a = np.array([r["mae"] for r in arm["per_seed"]])
    gains = (b - a) / b
    out = {"relative_mae_gain": round(float((b.mean() - a.mean()) / b.mean()), 4),
           "gain_per_seed": [round(float(g), 4) for g in gains]}
    if len(gains) > 1:
        half = stats.t.ppf(0.975, len(gains) - 1) * gains.std(ddof=1) / np.sqrt(len(gains))
        out["gain_95ci"] = [round(float(gains.mean() - half), 4), round(float(gains.mean() + half), 4)]
        out["excludes_zero"] = bool(gains.mean() - half > 0 or gains.mean() + half < 0)
    return out


def summarise(runs: list[dict]) -> dict:
    def mean_std(k):
        v = np.array([r[k] for r in runs])
        return round(float(v.mean()), 4), round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)

    (mae, mae_sd), (rmse, rmse_sd), (exact, _) = mean_std("mae"), mean_std("rmse"), mean_std("exact")
    return {"mae_mean": mae, "mae_std": mae_sd, "rmse_mean": rmse, "rmse_std": rmse_sd, "exact_mean": exact,
            "synthetic_share_seen": mean_std("synthetic_share_seen")[0], "per_seed": runs}


def print_gains(arms: dict) -> None:
    log(f"\n{'counter':<9}{'variants':<22}{'test set':<22}{'MAE':>14}{'gain':>8}  95 % interval")
    for arch, by_name in arms.items():
        for name, arm in by_name.items():
            for t, r in arm.items():
                if t == "synthetic":
                    continue
                ci = r.get("gain_95ci")
                gain = f"{r['relative_mae_gain']:.3f}" if "relative_mae_gain" in r else ""
                log(f"{arch:<9}{name:<22}{t:<22}{r['mae_mean']:>8.3f}±{r['mae_std']:.3f}{gain:>8}  "
                    f"{ci if ci else ''}")


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
    g.add_argument("--gen-steps", type=int, default=SHIPPED_SAMPLER["steps"], help="DDIM steps")
    g.add_argument("--guidance", type=float, default=SHIPPED_SAMPLER["guidance"], help="classifier-free guidance")
    g.add_argument("--control-scale", type=float, default=SHIPPED_SAMPLER["control_scale"],
                   help="ControlNet conditioning scale")
    g.add_argument("--eta", type=float, default=SHIPPED_SAMPLER["eta"],
                   help="DDIM eta (the sets measured before the shipped sampler: --control-scale 1 --eta 0 "
                        "--condition-sigma 0)")
    g.add_argument("--condition-sigma", type=float, default=SHIPPED_SAMPLER["condition_sigma"],
                   help="the condition's Gaussians, px (0: the layout's own density map)")
    g.add_argument("--model", default="models/tiny-sd")
    g.add_argument("--controlnet", default="models/tiny-controlnet")
    g.add_argument("--clip", default="models/tiny-clip", help="OpenCLIP folder for caption similarity")
    g.add_argument("--check-counter", default="pixel", help="check_count counter: pixel or a counter folder")
    g.add_argument("--tolerance", type=int, default=None, help="drop variants whose recount is off by more "
                                                               "(default: keep all, as in the paper)")
    g.add_argument("--recipe-seed", type=int, default=0)
    g.add_argument("--filter", nargs="+", default=["none"], choices=("none", "objects", "realism", "both"),
                   help="variants kept: all (none), those the pixel object check passes (objects), those the "
                        "realism filter accepts (realism), or both; one synthetic set per value")
    g.add_argument("--realism", default="models/realism", help="GMM-VAE folder for --filter realism/both")
    g.add_argument("--workers", type=int, default=None, help="actors per stage")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    g = ap.add_argument_group("counter training")
    g.add_argument("--p0", type=float, default=0.5, help="chance a real sample is replaced by a variant")
    g.add_argument("--train-steps", type=int, default=1500)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--arch", nargs="+", default=["density"], choices=("density", "quarter"),
                   help="counter architectures trained for every arm")
    g.add_argument("--test-start", type=int, default=None,
                   help="also score on N_test test-pool scenes from this index (a second test set)")
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
    synthetic = {setting_name(pc, tc, f): synthetic_set(args, real_dir, pc, tc, f)
                 for pc, tc in settings(args.pc, args.tc) for f in args.filter}
    tests = {f"test:0:{args.n_test}": load_training_set(f"world:test:{args.n_test}")}
    if args.test_start is not None:
        tests[f"test:{args.test_start}:{args.n_test}"] = load_training_set(f"world:test:{args.n_test}:{args.test_start}")
    args.test_key = sorted(tests)

    arms: dict = {}
    for arch in args.arch:
        log(f"training ({arch}): real only")
        arms[arch] = {"real_only": train_arm(args, real_dir, None, tests, "real_only", arch)}
        for name, (folder, stats) in synthetic.items():
            log(f"training ({arch}): real + {name}")
            arm = train_arm(args, real_dir, folder, tests, name, arch)
            for t in tests:
                arm[t].update(paired_gain(arms[arch]["real_only"][t], arm[t]))
            arms[arch][name] = {**arm, "synthetic": stats}
    print_gains(arms)
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
